//! Batched greedy decoding (what the retention probe, self-replay and generation eval use) gives
//! every prompt the answer it gets alone, on a random tiny model with grouped-query attention.

use std::path::Path;

use finetune_trainer::generate::{
    Sampling, generate, generate_greedy_batch, generate_greedy_batch_until,
};
use finetune_trainer::model::weights::WeightMap;
use finetune_trainer::model::{CausalLm, ModelConfig};
use tch::{Device, Kind, Tensor};

fn random_model() -> CausalLm {
    tch::manual_seed(7);
    let (vocab, hidden, inter, layers, heads, kv_heads) = (97, 32, 64, 2, 4, 2);
    let head_dim = hidden / heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "tie_word_embeddings": true
    });
    let source = Path::new("random");
    let cfg = ModelConfig::from_hf_value(source, &config).unwrap();
    let mut w = WeightMap::default();
    let mut put = |name: String, shape: &[i64], scale: f64| {
        let t = Tensor::randn(shape, (Kind::Float, Device::Cpu)) * scale;
        w.insert(name, t, source);
    };
    put("model.embed_tokens.weight".into(), &[vocab, hidden], 1.0);
    put("model.norm.weight".into(), &[hidden], 1.0);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        put(format!("{p}.input_layernorm.weight"), &[hidden], 1.0);
        put(
            format!("{p}.post_attention_layernorm.weight"),
            &[hidden],
            1.0,
        );
        put(
            format!("{p}.self_attn.q_proj.weight"),
            &[heads * head_dim, hidden],
            0.3,
        );
        put(
            format!("{p}.self_attn.k_proj.weight"),
            &[kv_heads * head_dim, hidden],
            0.3,
        );
        put(
            format!("{p}.self_attn.v_proj.weight"),
            &[kv_heads * head_dim, hidden],
            0.3,
        );
        put(
            format!("{p}.self_attn.o_proj.weight"),
            &[hidden, heads * head_dim],
            0.3,
        );
        put(format!("{p}.mlp.gate_proj.weight"), &[inter, hidden], 0.3);
        put(format!("{p}.mlp.up_proj.weight"), &[inter, hidden], 0.3);
        put(format!("{p}.mlp.down_proj.weight"), &[hidden, inter], 0.3);
    }
    CausalLm::from_weights(cfg, w, source, Kind::Float, Device::Cpu).unwrap()
}

#[test]
fn batched_greedy_answers_equal_one_prompt_at_a_time() {
    let model = random_model();
    let prompts: Vec<Vec<i64>> = vec![
        vec![5, 17, 3],
        vec![42],
        // An empty prompt gets no answer and leaves the batch before the first step.
        vec![],
        vec![8, 9, 10, 11, 12, 13, 14, 15, 16],
        vec![60, 2, 2, 2, 71],
    ];
    let greedy = Sampling {
        temperature: None,
        top_p: 1.0,
        seed: None,
    };
    // An EOS id that some rows hit and others do not exercises rows finishing at different steps
    // (and leaving the batch from its middle).
    let alone: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| generate(&model, p, 12, &[], &greedy))
        .collect();
    let eos = alone[3][3];
    let alone: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| generate(&model, p, 12, &[eos], &greedy))
        .collect();
    let batched = generate_greedy_batch(&model, &prompts, 12, &[eos]);
    assert_eq!(batched, alone);
    assert!(alone.iter().any(|a| a.len() < 12) && alone.iter().any(|a| a.len() == 12));
}

#[test]
fn a_settled_answer_is_the_whole_answers_beginning() {
    let model = random_model();
    let prompts: Vec<Vec<i64>> = vec![vec![5, 17, 3], vec![42], vec![8, 9, 10, 11], vec![60, 71]];
    let whole = generate_greedy_batch(&model, &prompts, 12, &[]);
    // Row i settles after i + 2 tokens (row 1's prompt index, not its batch row, is asked), and
    // the rows still decoding get the answers they get when no row leaves early.
    let mut asked = Vec::new();
    let mut settled = |i: usize, ids: &[i64]| {
        asked.push(i);
        ids.len() == i + 2
    };
    let cut = generate_greedy_batch_until(&model, &prompts, 12, &[], &mut settled);
    for (i, (c, w)) in cut.iter().zip(&whole).enumerate() {
        assert_eq!(c.as_slice(), &w[..i + 2], "prompt {i}");
    }
    assert!(asked.contains(&3) && !asked.contains(&4));
}
