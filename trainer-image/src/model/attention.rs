//! Grouped-query self-attention with rotary embeddings and an optional key/value cache, computed by
//! libtorch's fused `scaled_dot_product_attention`.

use tch::{Kind, Tensor};

use crate::model::linear::Linear;
use crate::model::rope::apply_rotary;

/// Keys and values of earlier positions, one entry per layer, for incremental decoding.
#[derive(Debug, Default)]
pub struct KvCache {
    /// `(keys, values)`, each `[batch, kv_heads, past_len, head_dim]`; `None` before the first call.
    pub layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: (0..num_layers).map(|_| None).collect(),
        }
    }

    /// How many positions are cached (the position of the next token).
    pub fn len(&self) -> i64 {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.size()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the batch rows `rows` (an index tensor on the cache's device), in that order:
    /// a batched decode drops the rows whose answers ended.
    pub fn keep_rows(&mut self, rows: &Tensor) {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(0, rows);
            *v = v.index_select(0, rows);
        }
    }
}

#[derive(Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub num_heads: i64,
    pub num_kv_heads: i64,
    pub head_dim: i64,
}

/// Repeats each key/value head `n` times so grouped-query heads line up with query heads
/// (`repeat_kv` in transformers).
fn repeat_kv(x: &Tensor, n: i64) -> Tensor {
    if n == 1 {
        return x.shallow_clone();
    }
    let (b, h, s, d) = x.size4().expect("kv is 4-d");
    x.unsqueeze(2)
        .expand([b, h, n, s, d], false)
        .reshape([b, h * n, s, d])
}

/// One batch of several run side by side as a single row ([`Attention::forward_side`]): its
/// `[batch, seq]` shape and its boolean mask `[batch, 1, seq, seq]` (`None`: plain causal).
pub struct SideBatch {
    pub batch: i64,
    pub seq: i64,
    pub mask: Option<Tensor>,
}

impl Attention {
    /// `x` `[batch, seq, hidden]`; `mask` is a boolean `[batch, 1, seq, past+seq]` (true = attend) or
    /// `None` for plain causal attention without a cache.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
    ) -> Tensor {
        let (q, mut k, mut v) = self.heads(x, cos, sin);
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2);
                v = Tensor::cat(&[pv, &v], 2);
            }
            *slot = Some((k.shallow_clone(), v.shallow_clone()));
        }
        self.o_proj.forward(&self.attend(&q, &k, &v, mask))
    }

    /// Several batches side by side in one row: `x` `[1, Σ batch·seq, hidden]` holds each of
    /// `batches`' rows in turn, and `cos`/`sin` their positions. The projections act on every token
    /// at once (each weight read once for all the batches); each batch attends within itself
    /// under its own mask, as it would alone.
    pub fn forward_side(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batches: &[SideBatch],
    ) -> Tensor {
        let (q, k, v) = self.heads(x, cos, sin);
        let sizes: Vec<i64> = batches.iter().map(|b| b.batch * b.seq).collect();
        let (qs, ks, vs) = (
            q.split_with_sizes(&sizes, 2),
            k.split_with_sizes(&sizes, 2),
            v.split_with_sizes(&sizes, 2),
        );
        let outs: Vec<Tensor> = batches
            .iter()
            .enumerate()
            .map(|(i, b)| {
                // `[1, heads, batch·seq, d]` → `[batch, heads, seq, d]`.
                let unfold = |t: &Tensor| {
                    let h = t.size()[1];
                    t.reshape([h, b.batch, b.seq, self.head_dim])
                        .transpose(0, 1)
                };
                let out = self.attend(
                    &unfold(&qs[i]),
                    &unfold(&ks[i]),
                    &unfold(&vs[i]),
                    b.mask.as_ref(),
                );
                out.reshape([1, b.batch * b.seq, self.num_heads * self.head_dim])
            })
            .collect();
        self.o_proj.forward(&Tensor::cat(&outs, 1))
    }

    /// Queries, keys and values `[batch, heads, seq, head_dim]` of `x` `[batch, seq, hidden]`, the
    /// queries and keys rotated.
    fn heads(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (b, s, _) = x.size3().expect("hidden states are 3-d");
        let shape = |t: Tensor, heads: i64| t.view([b, s, heads, self.head_dim]).transpose(1, 2);
        let q = shape(self.q_proj.forward(x), self.num_heads);
        let k = shape(self.k_proj.forward(x), self.num_kv_heads);
        let v = shape(self.v_proj.forward(x), self.num_kv_heads);
        (apply_rotary(&q, cos, sin), apply_rotary(&k, cos, sin), v)
    }

    /// Attention of `q` over `k`, `v` (grouped-query heads repeated to line up) under `mask`
    /// (`None`: causal), as `[batch, seq, heads·head_dim]`, before the output projection.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let groups = self.num_heads / self.num_kv_heads;
        let k = repeat_kv(k, groups);
        let v = repeat_kv(v, groups);
        let scale = (self.head_dim as f64).powf(-0.5);
        let out = match mask {
            Some(m) => {
                Tensor::scaled_dot_product_attention(q, &k, &v, Some(m), 0.0, false, scale, false)
            }
            None => Tensor::scaled_dot_product_attention::<Tensor>(
                q, &k, &v, None, 0.0, true, scale, false,
            ),
        };
        let (b, _, s, _) = out.size4().expect("attention output is 4-d");
        out.transpose(1, 2)
            .contiguous()
            .view([b, s, self.num_heads * self.head_dim])
    }
}

/// Boolean attention mask `[batch, 1, q_len, past + q_len]`: causal over absolute positions, and
/// `padding` (`[batch, past + q_len]`, 1 = real token) removes padded keys.
pub fn build_mask(
    padding: Option<&Tensor>,
    batch: i64,
    past: i64,
    q_len: i64,
    device: tch::Device,
) -> Tensor {
    let total = past + q_len;
    let q_pos = Tensor::arange_start(past, total, (Kind::Int64, device)).view([q_len, 1]);
    let k_pos = Tensor::arange(total, (Kind::Int64, device)).view([1, total]);
    let causal = k_pos.le_tensor(&q_pos).view([1, 1, q_len, total]);
    match padding {
        Some(p) => causal.logical_and(&p.to_kind(Kind::Bool).view([batch, 1, 1, total])),
        None => causal.expand([batch, 1, q_len, total], false),
    }
}
