//! The model runtime against transformers: per-token log-probs (f32, ≤ 1e-4), greedy token ids
//! and the KV cache, on tiny random checkpoints recorded by tests/fixtures/generate.py.

use peftkit_core::model::{ForwardOptions, KvCache, Model, SeqInput};
use peftkit_tests::{
    fixtures, json_ids as ids, model_reference as reference, FIXTURE_MODELS as MODELS,
};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn load(name: &str) -> Model {
    Model::load(&fixtures().join("models").join(name)).unwrap()
}

#[test]
fn logprobs_match_transformers_batched() {
    let opts = ForwardOptions::default();
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        let samples = r["samples"].as_array().unwrap();
        let all_ids: Vec<Vec<u32>> = samples.iter().map(|s| ids(&s["input_ids"])).collect();
        // All samples in one batch: attention must not cross sequence boundaries.
        let seqs: Vec<SeqInput> = all_ids.iter().map(|i| SeqInput { ids: i }).collect();
        let hidden = model.forward(&seqs, None, &opts).unwrap();
        let mut targets = Vec::new();
        let mut row = 0;
        for i in &all_ids {
            for j in 0..i.len() - 1 {
                targets.push((row + j, i[j + 1]));
            }
            row += i.len();
        }
        let got = model.target_logprobs(&hidden, &targets, &opts);
        let want: Vec<f32> = samples
            .iter()
            .flat_map(|s| floats(&s["logprobs"]))
            .collect();
        assert_eq!(got.len(), want.len());
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max <= 1e-4, "{name}: max |Δ log-prob| = {max}");
    }
}

#[test]
fn greedy_with_kv_cache_matches_transformers() {
    let opts = ForwardOptions::default();
    for name in MODELS {
        let model = load(name);
        let r = reference(name);
        for g in r["greedy"].as_array().unwrap() {
            let prompt = ids(&g["input_ids"]);
            let want = ids(&g["new_token_ids"]);
            let mut cache = vec![KvCache::new(model.config.layers)];
            let mut next = prompt.clone();
            let mut got = Vec::new();
            for _ in 0..want.len() {
                let hidden = model
                    .forward(&[SeqInput { ids: &next }], Some(&mut cache), &opts)
                    .unwrap();
                let last = hidden.len() / model.config.hidden - 1;
                let h = &hidden[last * model.config.hidden..];
                let logits = model.logits(h, 1, &opts);
                let best = logits
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f32::NEG_INFINITY),
                        |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                    )
                    .0 as u32;
                got.push(best);
                next = vec![best];
            }
            assert_eq!(
                got, want,
                "{name}: greedy continuation of {:?}",
                g["prompt"]
            );
        }
    }
}
