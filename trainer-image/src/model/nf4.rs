//! NF4 (4-bit NormalFloat) weights as QLoRA keeps its frozen base: bitsandbytes 0.50.2's
//! `quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)` and its inverse.
//!
//! Each block of 64 values is scaled by its absolute maximum into [-1, 1] and every value is
//! replaced by the index of the nearest of 16 NF4 levels (normal-distribution quantiles), two
//! indices per byte. The per-block absmax (one float32 per 64 values, 0.5 bit per parameter) is
//! itself quantized ("double quantization"): minus its mean, in blocks of 256, to bitsandbytes'
//! signed 8-bit dynamic map with one float32 absmax per block. A parameter then costs
//! 0.5 + (1 + 4/256)/64 bytes.
//!
//! Every step is the same libtorch op, in the same order and dtype, as bitsandbytes' pure-torch
//! default backend (`backends/default/ops.py`), so the codes and the dequantized values are
//! bit-identical to it (tests/reference/test_nf4.py). bitsandbytes' CPU C kernel for the 8-bit
//! step (`cquantize_blockwise_cpu_fp32`) searches the map differently and picks another code for
//! a small share of absmax values; nearest-midpoint is what its torch and CUDA paths do.

use tch::{Device, Kind, Tensor};

/// Values per first-level block (bitsandbytes' and QLoRA's default).
pub const BLOCK: i64 = 64;
/// First-level absmax values per second-level block (`quantize_blockwise(blocksize=256)`).
pub const ABSMAX_BLOCK: i64 = 256;

/// bitsandbytes' NF4 levels (`get_4bit_type("nf4")`, from `create_normal_map(0.9677083)`), sorted,
/// so a value's code is the bucket of its scaled value among the midpoints.
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// A tensor held as NF4 with double-quantized absmax.
#[derive(Debug)]
pub struct Nf4 {
    /// `[ceil(n/2)]` uint8: element `2i` in the high nibble, `2i+1` in the low one (an odd count
    /// is padded with the code of 0.0), as bitsandbytes packs them.
    pub packed: Tensor,
    /// `[ceil(n/64)]` uint8: each block's absmax minus `offset`, as an index into [`dynamic_map`].
    pub absmax_codes: Tensor,
    /// `[ceil(n/64/256)]` float32: the scale of each block of 256 absmax codes (bnb's `state2.absmax`).
    pub absmax_scale: Tensor,
    /// Mean of the first-level absmax values, subtracted before they are quantized (bnb's `offset`).
    pub offset: f32,
    /// Shape of the original tensor.
    pub shape: Vec<i64>,
}

impl Nf4 {
    /// Quantizes a float tensor of any shape (computed in float32, on its device).
    pub fn quantize(x: &Tensor) -> Nf4 {
        let (packed, absmax) = quantize_4bit(x);
        // The mean is taken by libtorch's own reduction so that it rounds as bitsandbytes' does.
        let offset = absmax.mean(None::<Kind>);
        let (scaled_absmax, absmax_scale) = scale_blocks(&(&absmax - &offset), ABSMAX_BLOCK);
        let absmax_codes = scaled_absmax
            .bucketize(&midpoints(&dynamic_map_on(x.device())), true, false)
            .to_kind(Kind::Uint8);
        Nf4 {
            packed,
            absmax_codes,
            absmax_scale,
            offset: offset.double_value(&[]) as f32,
            shape: x.size(),
        }
    }

    /// The first-level absmax of every block of 64, float32, as dequantization sees it.
    pub fn absmax(&self) -> Tensor {
        let device = self.absmax_codes.device();
        let levels =
            dynamic_map_on(device).index_select(0, &self.absmax_codes.to_kind(Kind::Int64));
        scale_back(&levels, &self.absmax_scale, ABSMAX_BLOCK) + f64::from(self.offset)
    }

    /// The tensor in `kind`: level × block absmax in float32 (as bitsandbytes computes it), then cast.
    pub fn dequantize(&self, kind: Kind) -> Tensor {
        let device = self.packed.device();
        let codes = Tensor::stack(
            &[
                self.packed.bitwise_right_shift_tensor_scalar(4),
                self.packed.bitwise_and(0x0f),
            ],
            1,
        )
        .reshape([-1])
        .narrow(0, 0, self.numel())
        .to_kind(Kind::Int64);
        let levels = Tensor::from_slice(&NF4_LEVELS)
            .to_device(device)
            .index_select(0, &codes);
        scale_back(&levels, &self.absmax(), BLOCK)
            .reshape(self.shape.as_slice())
            .to_kind(kind)
    }

    /// Number of values.
    pub fn numel(&self) -> i64 {
        self.shape.iter().product()
    }

    /// Bytes held: codes, absmax codes, their scales and the offset (the two level tables are
    /// shared by every tensor and not counted).
    pub fn bytes(&self) -> i64 {
        self.packed.numel() as i64
            + self.absmax_codes.numel() as i64
            + 4 * self.absmax_scale.numel() as i64
            + 4
    }
}

/// The first level alone: the packed codes and the float32 absmax of every block of 64 (bnb's
/// `quantize_4bit` kernel before `compress_statistics`).
pub fn quantize_4bit(x: &Tensor) -> (Tensor, Tensor) {
    let flat = x.reshape([-1]).to_kind(Kind::Float);
    let (mut scaled, absmax) = scale_blocks(&flat, BLOCK);
    if scaled.size()[0] % 2 == 1 {
        scaled = scaled.constant_pad_nd([0, 1]);
    }
    let levels = Tensor::from_slice(&NF4_LEVELS).to_device(x.device());
    let codes = scaled
        .bucketize(&midpoints(&levels), true, false)
        .to_kind(Kind::Uint8)
        .reshape([-1, 2]);
    let packed = codes
        .select(1, 0)
        .bitwise_left_shift_tensor_scalar(4)
        .bitwise_or_tensor(&codes.select(1, 1));
    (packed, absmax)
}

/// Splits `x` (1-D float32) into blocks of `block`; returns every value divided by its block's
/// absmax and clamped to [-1, 1], and the absmax per block. Full blocks multiply by the reciprocal,
/// a short last block divides, and only the last block's absmax is stored clamped to 1e-38: each
/// as bitsandbytes' default backend does, since a different rounding would change codes.
fn scale_blocks(x: &Tensor, block: i64) -> (Tensor, Tensor) {
    let n = x.size()[0];
    let full = n - n % block;
    let body = x.narrow(0, 0, full).reshape([-1, block]);
    let mut absmax = body.abs().amax([-1], false);
    let mut scaled = (&body * absmax.clamp_min(1e-38).reciprocal().view([-1, 1]))
        .clamp(-1.0, 1.0)
        .reshape([-1]);
    if full < n {
        let tail = x.narrow(0, full, n - full);
        let tail_absmax = tail.abs().max().clamp_min(1e-38);
        absmax = Tensor::cat(&[absmax, tail_absmax.unsqueeze(0)], 0);
        scaled = Tensor::cat(&[scaled, (tail / &tail_absmax).clamp(-1.0, 1.0)], 0);
    }
    (scaled, absmax)
}

/// `values` (1-D, one per element) times their block's `absmax`.
fn scale_back(values: &Tensor, absmax: &Tensor, block: i64) -> Tensor {
    let n = values.size()[0];
    let blocks = absmax.size()[0];
    (values
        .constant_pad_nd([0, blocks * block - n])
        .reshape([blocks, block])
        * absmax.view([-1, 1]))
    .reshape([-1])
    .narrow(0, 0, n)
}

/// Bucket boundaries between neighbouring sorted levels, computed in float32 like bitsandbytes.
fn midpoints(levels: &Tensor) -> Tensor {
    let n = levels.size()[0];
    (levels.narrow(0, 0, n - 1) + levels.narrow(0, 1, n - 1)) / 2.0
}

fn dynamic_map_on(device: Device) -> Tensor {
    Tensor::from_slice(&dynamic_map()).to_device(device)
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`: 256 sorted
/// levels in [-1, 1], dense near zero. For exponent `i` the fraction levels are the midpoints of
/// `linspace(0.1, 1, 2^i + 1)` times `10^(i-6)`, both signs; then 0 and 1. Built with the same
/// float32 libtorch ops as bnb so each level is the same float.
pub fn dynamic_map() -> Vec<f32> {
    const MAX_EXPONENT_BITS: i32 = 7;
    const TOTAL_BITS: i32 = 8;
    let non_sign_bits = TOTAL_BITS - 1;
    let fraction_levels = |count: i64, exponent: i32| -> Vec<f32> {
        let bounds = Tensor::linspace(0.1, 1.0, count + 1, (Kind::Float, Device::Cpu));
        let means = (bounds.narrow(0, 0, count) + bounds.narrow(0, 1, count)) / 2.0;
        // Python's `10 ** k` for k < 0 is libm's pow; the scalar then multiplies in float32.
        let scale = 10f64.powf(f64::from(exponent - (MAX_EXPONENT_BITS - 1)));
        let mut out = Vec::<f32>::try_from(&means * scale).expect("float32 levels");
        out.extend(Vec::<f32>::try_from(&means * -scale).expect("float32 levels"));
        out
    };
    let mut data = Vec::with_capacity(1 << TOTAL_BITS);
    for i in 0..MAX_EXPONENT_BITS {
        data.extend(fraction_levels(
            1 << (i + non_sign_bits - MAX_EXPONENT_BITS),
            i,
        ));
    }
    // With 7 exponent bits of 7 there is no all-zero-exponent region, and the 254 fraction levels
    // plus 0 and 1 fill the 256 codes without bnb's zero padding.
    debug_assert_eq!((1 << (non_sign_bits - MAX_EXPONENT_BITS)) - 1, 0);
    data.push(0.0);
    data.push(1.0);
    data.resize(1 << TOTAL_BITS, 0.0);
    data.sort_by(f32::total_cmp);
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    fn randn(shape: &[i64], seed: i64) -> Tensor {
        tch::manual_seed(seed);
        Tensor::randn(shape, (Kind::Float, Device::Cpu))
    }

    #[test]
    fn the_dynamic_map_is_256_sorted_levels_from_minus_one_to_one() {
        let m = dynamic_map();
        assert_eq!(m.len(), 256);
        assert!(m.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m[0] > -1.0 && m[0] < -0.99, "{}", m[0]);
        assert!(m.contains(&0.0));
        // The densest region: 1e-6 × midpoints of linspace(0.1, 1, 2).
        let smallest = m
            .iter()
            .copied()
            .filter(|&v| v > 0.0)
            .fold(f32::MAX, f32::min);
        assert!((smallest - 0.55e-6).abs() < 1e-9, "{smallest}");
    }

    #[test]
    fn round_trip_error_is_within_half_the_nf4_spacing_times_absmax() {
        let x = randn(&[37, 131], 0) * 0.02;
        let q = Nf4::quantize(&x);
        let y = q.dequantize(Kind::Float);
        assert_eq!(y.size(), x.size());
        let widest_gap = NF4_LEVELS
            .windows(2)
            .map(|w| w[1] - w[0])
            .fold(0.0f32, f32::max);
        // Per block: |x - y| <= (gap/2) · absmax, plus the double quantization's error on absmax
        // (half a step of the 8-bit dynamic map, under 1 % of absmax).
        let flat = x.reshape([-1]);
        let n = flat.size()[0];
        let err = (&flat - y.reshape([-1])).abs();
        let pad = (BLOCK - n % BLOCK) % BLOCK;
        let absmax = flat
            .abs()
            .constant_pad_nd([0, pad])
            .reshape([-1, BLOCK])
            .amax([-1], true);
        let bound = (absmax * (f64::from(widest_gap) / 2.0 + 0.01))
            .expand([-1, BLOCK], false)
            .reshape([-1])
            .narrow(0, 0, n);
        let over = err.gt_tensor(&bound).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(over, 0, "{over} values beyond the NF4 spacing");
        // And not trivially: the error is of the order of the spacing.
        assert!(err.max().double_value(&[]) > 1e-4);
    }

    #[test]
    fn the_extremes_of_each_block_come_back_within_the_absmax_quantization() {
        let x = randn(&[4, 64], 1);
        let y = Nf4::quantize(&x).dequantize(Kind::Float);
        let absmax = x.abs().amax([-1], false);
        let back = y.abs().amax([-1], false);
        let rel = ((back - &absmax) / absmax).abs().max().double_value(&[]);
        assert!(rel < 0.01, "absmax off by {rel}");
    }

    #[test]
    fn zeros_stay_zero_even_in_a_block_of_only_zeros() {
        let x = randn(&[3 * BLOCK + 5], 2);
        let _ = x.narrow(0, BLOCK, BLOCK).fill_(0.0);
        let _ = x.narrow(0, 7, 3).fill_(0.0);
        let y = Nf4::quantize(&x).dequantize(Kind::Float);
        let zeros = x.eq(0.0);
        assert_eq!(zeros.sum(Kind::Int64).int64_value(&[]), BLOCK + 3);
        assert!(y.masked_select(&zeros).eq(0.0).all().int64_value(&[]) == 1);
        assert!(y.isfinite().all().int64_value(&[]) == 1);
    }

    #[test]
    fn codes_are_packed_high_nibble_first_and_an_odd_count_is_padded() {
        // Exactly the levels, scaled by an absmax of 2: codes are their indices.
        let idx: Vec<i64> = vec![15, 0, 7, 3, 12];
        let vals: Vec<f32> = idx.iter().map(|&i| 2.0 * NF4_LEVELS[i as usize]).collect();
        let q = Nf4::quantize(&Tensor::from_slice(&vals));
        let packed = Vec::<u8>::try_from(&q.packed).unwrap();
        assert_eq!(packed, vec![0xf0, 0x73, 0xc7]);
        let back = Vec::<f32>::try_from(q.dequantize(Kind::Float)).unwrap();
        for (b, v) in back.iter().zip(&vals) {
            assert!((b - v).abs() <= 2.0 * 0.01, "{b} vs {v}");
        }
    }

    #[test]
    fn memory_is_half_a_byte_per_parameter_plus_the_quantized_absmax() {
        let n: i64 = 1 << 20;
        let q = Nf4::quantize(&randn(&[1024, 1024], 3));
        let blocks = n / BLOCK;
        let expected = n / 2 + blocks + 4 * ((blocks + ABSMAX_BLOCK - 1) / ABSMAX_BLOCK) + 4;
        assert_eq!(q.bytes(), expected);
        let per_param = q.bytes() as f64 / n as f64;
        let model = 0.5 + (1.0 + 4.0 / 256.0) / 64.0;
        assert!((per_param - model).abs() < 1e-5, "{per_param} vs {model}");
    }

    #[test]
    fn dequantize_casts_to_the_compute_dtype() {
        let x = randn(&[2, 100], 4);
        let q = Nf4::quantize(&x);
        let f = q.dequantize(Kind::Float);
        let b = q.dequantize(Kind::BFloat16);
        assert_eq!(b.kind(), Kind::BFloat16);
        assert!(f.to_kind(Kind::BFloat16).equal(&b));
    }
}
