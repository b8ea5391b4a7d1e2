//! A checkpoint's tensors by Hugging Face name, as the loaders produce them and the model consumes
//! them. Taking a tensor checks its shape against the config, so a mismatched checkpoint fails at
//! load time with the file and tensor named instead of deep inside a matmul.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::error::{Error, Result};
use crate::model::quantized::QuantizedWeight;

#[derive(Debug, Default)]
pub struct WeightMap {
    tensors: BTreeMap<String, (Tensor, PathBuf)>,
    /// Weights kept in their file's quantized blocks (a GGUF base for `baseQuantization: gguf`).
    quantized: BTreeMap<String, (QuantizedWeight, PathBuf)>,
}

impl WeightMap {
    pub fn insert(&mut self, name: String, tensor: Tensor, file: &Path) {
        self.tensors.insert(name, (tensor, file.to_path_buf()));
    }

    pub fn insert_quantized(&mut self, name: String, weight: QuantizedWeight, file: &Path) {
        self.quantized.insert(name, (weight, file.to_path_buf()));
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.quantized.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.tensors.len() + self.quantized.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes and returns `name` when it was kept quantized, checking its `shape`; `None` when
    /// it is not (it may then be a plain tensor).
    pub fn take_quantized(&mut self, name: &str, shape: &[i64]) -> Result<Option<QuantizedWeight>> {
        let Some((q, file)) = self.quantized.remove(name) else {
            return Ok(None);
        };
        check_shape(&file, name, &q.shape(), shape)?;
        Ok(Some(q))
    }

    /// Removes and returns `name`, which must have exactly `shape`. `checkpoint` names the source in
    /// the error when the tensor is missing altogether.
    pub fn take(&mut self, name: &str, shape: &[i64], checkpoint: &Path) -> Result<Tensor> {
        let (t, file) = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::tensor(checkpoint, name, "missing from the checkpoint"))?;
        check_shape(&file, name, &t.size(), shape)?;
        Ok(t)
    }

    /// Like [`take`](Self::take) but `None` when absent (optional biases, untied heads).
    pub fn take_optional(
        &mut self,
        name: &str,
        shape: &[i64],
        checkpoint: &Path,
    ) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.take(name, shape, checkpoint).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Names nobody took: reported as a warning, since extra tensors are harmless but suspicious.
    pub fn remaining(&self) -> Vec<&str> {
        self.tensors
            .keys()
            .chain(self.quantized.keys())
            .map(String::as_str)
            .collect()
    }
}

/// A tensor's shape in the checkpoint against the one the config expects.
fn check_shape(file: &Path, name: &str, found: &[i64], expected: &[i64]) -> Result<()> {
    if found != expected {
        return Err(Error::tensor(
            file,
            name,
            format!("shape mismatch: checkpoint has {found:?}, config expects {expected:?}"),
        ));
    }
    Ok(())
}
