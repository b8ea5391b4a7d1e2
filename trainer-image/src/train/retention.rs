//! The retention set: what the run must not destroy.
//!
//! * **Texts** whose loss, before and after training, shows how much general language modelling the
//!   run cost (a positive delta = forgetting).
//! * **Questions** the base model answers greedily before the first update; the share of those
//!   answers the tuned model still gives is the retention score (see [`crate::train::probe`]). A
//!   loss delta can stay small while a model answers every question in the task's format; the
//!   answer probe catches that.
//!
//! Both come built in; `evaluation.retention.data` replaces them with a JSON Lines file of
//! `{"prompt": "..."}` (questions) and `{"text": "..."}` (texts) lines.

use std::path::Path;

use crate::error::{Error, Result};

pub const BUILTIN_TEXTS: [&str; 20] = [
    "The capital of France is Paris, a city known for the Eiffel Tower and the Louvre museum.",
    "Water boils at 100 degrees Celsius at sea level and freezes at 0 degrees Celsius.",
    "The Earth orbits the Sun once every 365.25 days, which is why we have a leap year every four years.",
    "Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide and water into sugar and oxygen.",
    "William Shakespeare wrote plays such as Hamlet, Macbeth and Romeo and Juliet.",
    "To make a cup of tea, boil water, pour it over a tea bag, wait a few minutes and remove the bag.",
    "The human heart has four chambers: two atria and two ventricles.",
    "A triangle has three sides, and the sum of its interior angles is 180 degrees.",
    "The Pacific Ocean is the largest and deepest ocean on Earth.",
    "In 1969, Neil Armstrong became the first person to walk on the Moon.",
    "Regular exercise, a balanced diet and enough sleep help people stay healthy.",
    "Python is a popular programming language known for its readable syntax.",
    "The Great Wall of China stretches for thousands of kilometres across northern China.",
    "Bees collect nectar from flowers and turn it into honey inside their hives.",
    "The speed of light in a vacuum is about 300,000 kilometres per second.",
    "Mount Everest, at 8,849 metres, is the highest mountain above sea level.",
    "A library lends books, magazines and films to the members of its community.",
    "Dear Sam, thank you for the lovely birthday gift. I hope we can meet again soon. Best wishes, Alex.",
    "The mitochondria are often called the powerhouse of the cell because they produce energy.",
    "If it rains tomorrow, we will move the picnic indoors and play board games instead.",
];

/// General questions with short answers: facts, arithmetic, everyday instructions, formats the
/// fine-tuning tasks do not teach.
pub const BUILTIN_QUESTIONS: [&str; 30] = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "What is 7 plus 5?",
    "What colour is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in degrees Celsius?",
    "Name the largest planet in our solar system.",
    "How many legs does a spider have?",
    "What is the opposite of hot?",
    "Translate 'thank you' into French.",
    "What is 12 divided by 3?",
    "Which animal is known as the king of the jungle?",
    "What gas do plants absorb from the air?",
    "How many continents are there?",
    "What is the chemical symbol for gold?",
    "Give me a synonym for happy.",
    "What is the square root of 81?",
    "In which season do leaves fall from the trees?",
    "What is the largest ocean on Earth?",
    "How many hours are in a day?",
    "What do bees make?",
    "Write the word 'cat' in capital letters.",
    "What is the first month of the year?",
    "Which is heavier, a kilogram of iron or a kilogram of feathers?",
    "What language is spoken in Brazil?",
    "How many sides does a hexagon have?",
    "What is the freezing point of water in Fahrenheit?",
    "Who painted the Mona Lisa?",
    "What is the plural of mouse?",
    "Complete the sentence: an apple a day keeps the ...",
];

/// Questions for the answer probe and texts for the loss delta.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionSet {
    pub questions: Vec<String>,
    pub texts: Vec<String>,
    /// Where it came from, for logs and the summary.
    pub source: String,
}

impl RetentionSet {
    pub fn builtin() -> Self {
        RetentionSet {
            questions: BUILTIN_QUESTIONS.iter().map(|q| q.to_string()).collect(),
            texts: BUILTIN_TEXTS.iter().map(|t| t.to_string()).collect(),
            source: "built-in".into(),
        }
    }

    /// Reads a JSON Lines file of `{"prompt": ...}` and `{"text": ...}` lines (blank lines
    /// skipped); errors name the file and line.
    pub fn from_jsonl(path: &Path) -> Result<Self> {
        let content = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut set = RetentionSet {
            questions: Vec::new(),
            texts: Vec::new(),
            source: path.display().to_string(),
        };
        let bad = |line: usize, message: String| Error::Data {
            path: path.to_path_buf(),
            line,
            message,
        };
        for (i, raw) in content.lines().enumerate() {
            let line = i + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(raw).map_err(|e| bad(line, format!("invalid JSON: {e}")))?;
            let field = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
            match (field("prompt"), field("text")) {
                (Some(p), _) if !p.trim().is_empty() => set.questions.push(p),
                (None, Some(t)) if !t.trim().is_empty() => set.texts.push(t),
                _ => {
                    return Err(bad(
                        line,
                        "expected a non-empty string field `prompt` (a question) or `text`".into(),
                    ));
                }
            }
        }
        if set.questions.is_empty() && set.texts.is_empty() {
            return Err(bad(0, "the retention set is empty".into()));
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_set_splits_questions_and_texts_and_names_bad_lines() {
        let dir = std::env::temp_dir().join(format!("retention-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("r.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"2+2?\"}\n\n{\"text\": \"Snow is white.\"}\n",
        )
        .unwrap();
        let set = RetentionSet::from_jsonl(&p).unwrap();
        assert_eq!(set.questions, vec!["2+2?"]);
        assert_eq!(set.texts, vec!["Snow is white."]);
        std::fs::write(&p, "{\"prompt\": \"ok\"}\n{\"question\": \"no\"}\n").unwrap();
        let e = RetentionSet::from_jsonl(&p).unwrap_err().to_string();
        assert!(
            e.contains("r.jsonl") && e.contains(":2") && e.contains("prompt"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
