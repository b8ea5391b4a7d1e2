//! A GGUF file's Q8_0, Q4_0 and Q4_1 blocks kept as they are in the file, for a QLoRA run that
//! trains on a quantized GGUF base without ever expanding it (`baseQuantization: gguf`).
//!
//! Each block covers 32 consecutive values of a row and holds a float16 scale `d` (and for Q4_1 a
//! float16 minimum `m`) followed by the codes: 32 signed bytes (Q8_0, `x = q·d`) or 16 bytes of
//! nibbles, low nibbles first (Q4_0, `x = (q − 8)·d`; Q4_1, `x = q·d + m`). The blocks are split
//! into per-row tensors of scales and codes so that dequantization is a few libtorch ops on the
//! layer's device, computed in float32 exactly as [`crate::load::gguf::dequantize`] computes it,
//! then cast to the compute dtype.

use tch::{Device, Kind, Tensor};

use crate::load::gguf::GgmlType;

/// Values per ggml block for the three types.
pub const BLOCK: i64 = 32;

/// One weight matrix `[rows, cols]` held as ggml blocks.
#[derive(Debug)]
pub struct GgmlBlocks {
    pub ty: GgmlType,
    /// `[rows, cols/32]` float16 block scales.
    pub d: Tensor,
    /// `[rows, cols/32]` float16 block minimums (Q4_1 only).
    pub m: Option<Tensor>,
    /// `[rows, cols/32, 32]` int8 codes (Q8_0) or `[rows, cols/32, 16]` uint8 nibble pairs (Q4_*).
    pub qs: Tensor,
    /// `[rows, cols]`.
    pub shape: Vec<i64>,
}

impl GgmlBlocks {
    /// Splits the raw bytes of a `[rows, cols]` tensor of `ty` (whole blocks, checked by the
    /// caller) into scales and codes. `None` when `ty` is not a block type or `cols` is not a
    /// whole number of blocks.
    pub fn from_raw(ty: GgmlType, raw: &[u8], rows: i64, cols: i64) -> Option<Self> {
        let (block_elems, block_bytes) = ty.block();
        let (code_bytes, with_min) = match ty {
            GgmlType::Q8_0 => (32, false),
            GgmlType::Q4_0 => (16, false),
            GgmlType::Q4_1 => (16, true),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => return None,
        };
        if block_elems != BLOCK as u64 || cols % BLOCK != 0 || rows < 0 {
            return None;
        }
        let blocks = (rows * (cols / BLOCK)) as usize;
        if raw.len() != blocks * block_bytes as usize {
            return None;
        }
        let mut d = Vec::with_capacity(blocks * 2);
        let mut m = Vec::with_capacity(if with_min { blocks * 2 } else { 0 });
        let mut qs = Vec::with_capacity(blocks * code_bytes);
        for block in raw.chunks_exact(block_bytes as usize) {
            d.extend_from_slice(&block[0..2]);
            let codes_at = if with_min {
                m.extend_from_slice(&block[2..4]);
                4
            } else {
                2
            };
            qs.extend_from_slice(&block[codes_at..codes_at + code_bytes]);
        }
        let per_row = [rows, cols / BLOCK];
        let half = |bytes: &[u8]| Tensor::f_from_data_size(bytes, &per_row, Kind::Half).ok();
        let code_kind = if ty == GgmlType::Q8_0 {
            Kind::Int8
        } else {
            Kind::Uint8
        };
        Some(GgmlBlocks {
            ty,
            d: half(&d)?,
            m: if with_min { Some(half(&m)?) } else { None },
            qs: Tensor::f_from_data_size(&qs, &[rows, cols / BLOCK, code_bytes as i64], code_kind)
                .ok()?,
            shape: vec![rows, cols],
        })
    }

    /// Applies `f` to every per-row tensor (e.g. llama.cpp's Q/K row permutation, which moves
    /// whole rows and so whole blocks); the first error stops it.
    pub fn try_map_rows(
        self,
        f: impl Fn(&Tensor) -> Result<Tensor, String>,
    ) -> Result<Self, String> {
        Ok(GgmlBlocks {
            d: f(&self.d)?,
            m: self.m.as_ref().map(&f).transpose()?,
            qs: f(&self.qs)?,
            ..self
        })
    }

    pub fn to_device(self, device: Device) -> Self {
        GgmlBlocks {
            d: self.d.to_device(device),
            m: self.m.as_ref().map(|m| m.to_device(device)),
            qs: self.qs.to_device(device),
            ..self
        }
    }

    /// The matrix in `kind`, computed in float32 as llama.cpp's reference dequantization does.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let d = self.d.to_kind(Kind::Float).unsqueeze(-1);
        let values = match self.ty {
            GgmlType::Q8_0 => self.qs.to_kind(Kind::Float) * d,
            _ => {
                // Byte b holds value i in its low nibble and value i + 16 in its high one.
                let q = self.qs.to_kind(Kind::Float);
                let high = (&q / 16.0).floor();
                let low = &q - &high * 16.0;
                let q = Tensor::cat(&[low, high], -1);
                match &self.m {
                    Some(m) => q * d + m.to_kind(Kind::Float).unsqueeze(-1),
                    None => (q - 8.0) * d,
                }
            }
        };
        values.reshape(self.shape.as_slice()).to_kind(kind)
    }

    /// Bytes held: scales, minimums and codes, as many as the file's blocks.
    pub fn bytes(&self) -> i64 {
        let n = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as i64;
        n(&self.d) + self.m.as_ref().map_or(0, n) + n(&self.qs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::gguf::dequantize;

    /// `rows × cols/32` random blocks of `ty` with finite, varied float16 scales.
    fn random_blocks(ty: GgmlType, rows: i64, cols: i64, seed: u64) -> Vec<u8> {
        let (_, block_bytes) = ty.block();
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        };
        let blocks = (rows * cols / BLOCK) as usize;
        let mut raw = Vec::with_capacity(blocks * block_bytes as usize);
        for _ in 0..blocks {
            for scale in 0..(if ty == GgmlType::Q4_1 { 2 } else { 1 }) {
                let v = (f32::from(next()) - 128.0) / 4096.0 + if scale == 0 { 0.0 } else { -0.03 };
                raw.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
            let codes = block_bytes as usize - if ty == GgmlType::Q4_1 { 4 } else { 2 };
            raw.extend((0..codes).map(|_| next()));
        }
        raw
    }

    #[test]
    fn blocks_dequantize_to_exactly_what_the_expanding_loader_produces() {
        for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1] {
            let (rows, cols) = (6, 96);
            let raw = random_blocks(ty, rows, cols, 7);
            let blocks = GgmlBlocks::from_raw(ty, &raw, rows, cols).unwrap();
            let expanded = Tensor::from_slice(&dequantize(ty, &raw)).reshape([rows, cols]);
            let ours = blocks.dequantize(Kind::Float);
            let diff = (&ours - &expanded).abs().max().double_value(&[]);
            assert_eq!(diff, 0.0, "{ty:?}");
            assert!(expanded.abs().max().double_value(&[]) > 0.0);
            let bf16 = blocks.dequantize(Kind::BFloat16);
            assert_eq!(bf16.kind(), Kind::BFloat16);
            assert!(
                bf16.to_kind(Kind::Float)
                    .allclose(&expanded, 1e-2, 1e-3, false)
            );
            let (_, block_bytes) = ty.block();
            assert_eq!(
                blocks.bytes() as usize,
                raw.len(),
                "{ty:?} holds its file bytes"
            );
            assert_eq!(raw.len() as i64, rows * cols / BLOCK * block_bytes as i64);
        }
    }

    #[test]
    fn a_row_permutation_moves_whole_rows_of_blocks() {
        let (rows, cols) = (8, 64);
        let raw = random_blocks(GgmlType::Q4_1, rows, cols, 3);
        let expanded = Tensor::from_slice(&dequantize(GgmlType::Q4_1, &raw)).reshape([rows, cols]);
        let reversed = GgmlBlocks::from_raw(GgmlType::Q4_1, &raw, rows, cols)
            .unwrap()
            .try_map_rows(|t| Ok(t.flip([0])))
            .unwrap();
        let diff = (reversed.dequantize(Kind::Float) - expanded.flip([0]))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn float_types_partial_blocks_and_short_data_are_not_blocks() {
        let raw = random_blocks(GgmlType::Q8_0, 2, 64, 1);
        assert!(GgmlBlocks::from_raw(GgmlType::F16, &raw, 2, 64).is_none());
        assert!(GgmlBlocks::from_raw(GgmlType::Q8_0, &raw, 2, 48).is_none());
        assert!(GgmlBlocks::from_raw(GgmlType::Q8_0, &raw[1..], 2, 64).is_none());
        assert!(GgmlBlocks::from_raw(GgmlType::Q8_0, &raw, 2, 64).is_some());
    }
}
