//! ppo-train's rollout side: batched KV-cache sampling gives what one-at-a-time generation
//! gives, and prompts load from every accepted record form.

use peftkit_core::generate::{generate, SamplingParams};
use peftkit_core::model::{ForwardOptions, Model};
use peftkit_core::rng::Rng;
use peftkit_core::tokenizer::TextTokenizer;
use peftkit_core::train::prompts::{load_prompts, prompt_ids, PromptOptions};
use peftkit_core::train::rollout::{row_rngs, sample_responses};
use peftkit_tests::fixtures;
use serde_json::json;

#[test]
fn batched_sampling_matches_one_sequence_at_a_time() {
    let model = Model::load(&fixtures().join("models").join("llama_gqa")).unwrap();
    let prompts: [&[u32]; 3] = [&[5, 17, 40], &[12, 7, 300, 45, 9, 81], &[99]];
    let opts = ForwardOptions::default();
    let greedy = SamplingParams {
        max_new_tokens: 7,
        ..Default::default()
    };
    // a stop token the greedy continuations hit, so sequences leave the batch at different steps
    let probe: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            generate(&model, p, &greedy, &[], &mut Rng::new(0), &opts, |_| {})
                .unwrap()
                .0
        })
        .collect();
    let stop = vec![probe[1][2]];
    let batched = sample_responses(
        &model,
        &prompts,
        &greedy,
        &stop,
        &mut vec![Rng::new(0); 3],
        &opts,
    )
    .unwrap();
    for (p, b) in prompts.iter().zip(&batched) {
        let (one, _) =
            generate(&model, p, &greedy, &stop, &mut Rng::new(0), &opts, |_| {}).unwrap();
        assert_eq!(b.ids, one, "prompt {p:?}");
        assert_eq!(b.stopped, one.last().is_some_and(|t| stop.contains(t)));
    }
    assert!(batched.iter().any(|b| b.stopped) && batched.iter().any(|b| !b.stopped));
    // sampling is reproducible from the seed, and each prompt's tokens depend on its own
    // generator alone: sampled alone, or in another batch (a data-parallel rank's share), a
    // prompt gets the very tokens it got in the whole batch
    let hot = SamplingParams {
        max_new_tokens: 12,
        temperature: 0.9,
        ..Default::default()
    };
    let rngs = row_rngs(&mut Rng::new(7), prompts.len());
    let a = sample_responses(&model, &prompts, &hot, &[], &mut rngs.clone(), &opts).unwrap();
    let b = sample_responses(&model, &prompts, &hot, &[], &mut rngs.clone(), &opts).unwrap();
    assert_eq!(a, b);
    for (i, p) in prompts.iter().enumerate() {
        let alone =
            sample_responses(&model, &[p], &hot, &[], &mut [rngs[i].clone()], &opts).unwrap();
        assert_eq!(alone[0], a[i], "prompt {i}");
    }
    let tail = sample_responses(
        &model,
        &prompts[1..],
        &hot,
        &[],
        &mut rngs[1..].to_vec(),
        &opts,
    )
    .unwrap();
    assert_eq!(tail[..], a[1..]);
}

#[test]
fn prompts_load_from_every_record_form() {
    let dir = fixtures().join("models").join("llama_gqa");
    let tok = TextTokenizer::load(&dir).unwrap();
    let text = prompt_ids(&tok, &json!({"prompt": "apple river"})).unwrap();
    assert_eq!(text, tok.encode("apple river").unwrap());
    assert_eq!(
        prompt_ids(&tok, &json!({"query": "apple river"})).unwrap(),
        text
    );
    assert_eq!(prompt_ids(&tok, &json!("apple river")).unwrap(), text);
    // a conversation drops its trailing assistant turn and ends with the generation prompt
    let user = json!([{"role": "user", "content": "hi"}]);
    let with_answer =
        json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]);
    let a = prompt_ids(&tok, &json!({ "messages": user })).unwrap();
    assert_eq!(
        prompt_ids(&tok, &json!({ "messages": with_answer })).unwrap(),
        a
    );
    assert_eq!(prompt_ids(&tok, &json!({ "prompt": user })).unwrap(), a);
    let sharegpt = json!({"conversations": [{"from": "human", "value": "hi"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}});
    assert_eq!(prompt_ids(&tok, &sharegpt).unwrap(), a);
    let rendered = tok
        .apply_chat_template(
            &[peftkit_core::tokenizer::Message {
                role: "user".into(),
                content: "hi".into(),
            }],
            true,
        )
        .unwrap();
    assert_eq!(a, tok.encode_plain(&rendered).unwrap());
    let alpaca = prompt_ids(&tok, &json!({"instruction": "Add", "input": "1 and 2"})).unwrap();
    assert_eq!(
        alpaca,
        tok.encode(&peftkit_core::train::data::alpaca_prompt("Add", "1 and 2"))
            .unwrap()
    );
    assert!(prompt_ids(&tok, &json!({"answer": 1}))
        .unwrap_err()
        .contains("found keys"));

    // files: long prompts dropped and counted, bad lines skipped when asked
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("p.jsonl");
    std::fs::write(
        &p,
        "{\"prompt\": \"short\"}\n{\"prompt\": \"a much much much longer prompt than that\"}\nnot json\n",
    )
    .unwrap();
    let opts = PromptOptions {
        max_len: 8,
        skip_bad_lines: true,
    };
    let (ps, st) = load_prompts(&p, &tok, &opts).unwrap();
    assert_eq!((ps.len(), st.dropped_long, st.skipped_bad_lines), (1, 1, 1));
    assert_eq!(ps[0].line, 1);
    let strict = PromptOptions {
        max_len: 8,
        skip_bad_lines: false,
    };
    let e = load_prompts(&p, &tok, &strict).unwrap_err().to_string();
    assert!(e.contains("line 3"), "{e}");
}
