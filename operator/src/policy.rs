//! What a tenant may ask of the cluster through a FinetuneJob, set by the cluster admin
//! (operator flags, chart values `trainer.allowedImages` / `trainer.allowedPriorityClasses`): the
//! trainer images a job may run and the PriorityClasses it may claim. A job outside the policy
//! fails with reason `NotAllowed` before anything is created for it. By default only the
//! operator's own trainer image runs, and any PriorityClass the namespace may use.

use finetune_crds::FinetuneJob;

/// The admin's allow-lists.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Policy {
    /// Images `spec.image` may name: exact, or a prefix ending in `*` (`registry.corp/ml/*`).
    /// Empty: only the default trainer image.
    pub images: Vec<String>,
    /// PriorityClasses `spec.resources.priorityClassName` may name. Empty: any.
    pub priority_classes: Vec<String>,
}

impl Policy {
    /// Why `job` may not run here, naming the field and what is allowed; `None` when it may.
    pub fn refusal(&self, job: &FinetuneJob, default_image: &str) -> Option<String> {
        if let Some(image) = &job.spec.image
            && image != default_image
            && !self.images.iter().any(|pattern| matches(pattern, image))
        {
            let allowed = if self.images.is_empty() {
                format!("only the operator's trainer image {default_image}")
            } else {
                self.images.join(", ")
            };
            return Some(format!(
                "spec.image {image} is not allowed on this cluster (allowed: {allowed}); ask the \
                 cluster admin to add it to the operator's --allowed-trainer-image"
            ));
        }
        if let Some(class) = &job.spec.resources.priority_class_name
            && !self.priority_classes.is_empty()
            && !self.priority_classes.contains(class)
        {
            return Some(format!(
                "spec.resources.priorityClassName {class} is not allowed on this cluster \
                 (allowed: {})",
                self.priority_classes.join(", ")
            ));
        }
        None
    }
}

/// `pattern` is an exact image reference, or a prefix followed by `*`.
fn matches(pattern: &str, image: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => image.starts_with(prefix),
        None => pattern == image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT: &str = "ghcr.io/finetune-operator/trainer:0.1.0";

    fn job(image: Option<&str>, class: Option<&str>) -> FinetuneJob {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../examples/sft-lora-smollm2.yaml"
        ))
        .unwrap();
        let mut job: FinetuneJob = finetune_crds::parse_manifest(&text, "example").unwrap();
        job.spec.image = image.map(Into::into);
        job.spec.resources.priority_class_name = class.map(Into::into);
        job
    }

    #[test]
    fn by_default_only_the_operators_image_runs() {
        let policy = Policy::default();
        assert_eq!(policy.refusal(&job(None, None), DEFAULT), None);
        assert_eq!(policy.refusal(&job(Some(DEFAULT), None), DEFAULT), None);
        let why = policy
            .refusal(&job(Some("docker.io/attacker/miner:latest"), None), DEFAULT)
            .unwrap();
        assert!(
            why.contains("spec.image docker.io/attacker/miner:latest is not allowed"),
            "{why}"
        );
        assert!(why.contains(DEFAULT), "{why}");
        assert_eq!(policy.refusal(&job(None, Some("anything")), DEFAULT), None);
    }

    #[test]
    fn allow_lists_take_exact_names_and_prefixes() {
        let policy = Policy {
            images: vec![
                "registry.corp/ml/*".into(),
                "ghcr.io/org/trainer:1.2".into(),
            ],
            priority_classes: vec!["training-low".into()],
        };
        for ok in ["registry.corp/ml/trainer:2", "ghcr.io/org/trainer:1.2"] {
            assert_eq!(policy.refusal(&job(Some(ok), None), DEFAULT), None, "{ok}");
        }
        for bad in ["registry.corp/other/x", "ghcr.io/org/trainer:1.3"] {
            assert!(
                policy.refusal(&job(Some(bad), None), DEFAULT).is_some(),
                "{bad}"
            );
        }
        assert_eq!(
            policy.refusal(&job(None, Some("training-low")), DEFAULT),
            None
        );
        let why = policy
            .refusal(&job(None, Some("system-cluster-critical")), DEFAULT)
            .unwrap();
        assert!(
            why.contains("priorityClassName system-cluster-critical"),
            "{why}"
        );
    }
}
