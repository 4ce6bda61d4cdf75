//! Reward models as transformers saves them (`…ForSequenceClassification`, num_labels 1) and as
//! rm-train `--method full` writes them: `load_reward_model` and `rm-score --model DIR` (no
//! --adapter) give transformers' scores (tests/fixtures/preference/seq_cls, made by
//! tests/fixtures/generate_rm_seq_cls.py), rm-train's own scores survive the round trip through
//! the folder, and folders that are not one-label reward models fail with one line.

use peftkit_core::tokenizer::TextTokenizer;
use peftkit_core::train::pairs::{load_pairs, PairOptions};
use peftkit_core::train::preference::{load_reward_model, reward_pad, score_sequences};
use peftkit_tests::{assert_clean_error, copy_dir, fixtures, json_ids, read_json, run};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn seq_cls() -> PathBuf {
    fixtures().join("preference").join("seq_cls")
}

const FOLDERS: [&str; 2] = ["llama", "gpt2"];

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    let d = (got - want).abs();
    assert!(
        d <= tol,
        "{what}: ours {got}, reference {want} (|Δ| {d:.3e})"
    );
}

#[test]
fn transformers_seq_cls_folders_give_transformers_scores() {
    for name in FOLDERS {
        let dir = seq_cls().join(name);
        let r = read_json(&dir.join("reference.json"));
        let tol = r["tolerance"].as_f64().unwrap();
        let (model, mut state) = load_reward_model(&dir, None).unwrap();
        assert!(model.config.seq_cls, "{name}");
        assert!(
            model.lm_head.is_none(),
            "{name}: a score model has no LM head"
        );
        assert_eq!(state.score.as_ref().unwrap().len(), model.config.hidden);
        let tok = TextTokenizer::load(&dir).unwrap();
        let pad = reward_pad(&model, &tok);
        // transformers reads config.pad_token_id (null for the GPT-2 folder even though the
        // tokenizer has an EOS)
        assert_eq!(pad, r["pad_token_id"].as_u64().map(|p| p as u32), "{name}");

        // token-id rows, padding included, in batches of 3 (sequences are packed, not padded)
        let rows = r["sequences"].as_array().unwrap();
        let seqs: Vec<Vec<u32>> = rows.iter().map(|x| json_ids(&x["ids"])).collect();
        let got = score_sequences(&model, &mut state, &seqs, pad, 3).unwrap();
        for (i, (g, x)) in got.iter().zip(rows).enumerate() {
            let want = x["score"].as_f64().unwrap();
            close(f64::from(*g), want, tol, &format!("{name} row {i}"));
            // the reference shows the read position matters wherever it is not the last one
            if x["score_index"].as_u64().unwrap() as usize != seqs[i].len() - 1 {
                assert!((x["last_position_score"].as_f64().unwrap() - want).abs() > 1e-3);
            }
        }

        // texts: our tokenizer gives the recorded ids, and the scores match
        let texts = r["texts"].as_array().unwrap();
        let ids: Vec<Vec<u32>> = texts
            .iter()
            .map(|t| tok.encode(t["text"].as_str().unwrap()).unwrap())
            .collect();
        for (i, t) in texts.iter().enumerate() {
            assert_eq!(ids[i], json_ids(&t["ids"]), "{name} text {i} ids");
        }
        let got = score_sequences(&model, &mut state, &ids, pad, 8).unwrap();
        for (i, (g, t)) in got.iter().zip(texts).enumerate() {
            close(
                f64::from(*g),
                t["score"].as_f64().unwrap(),
                tol,
                &format!("{name} text {i}"),
            );
        }
    }
}

#[test]
fn rm_score_scores_a_seq_cls_folder_without_an_adapter() {
    for name in FOLDERS {
        let dir = seq_cls().join(name);
        let r = read_json(&dir.join("reference.json"));
        let tol = r["tolerance"].as_f64().unwrap();

        let texts = seq_cls().join("texts.jsonl");
        let out = run(
            "rm-score",
            &["--model", s(&dir), "--data", s(&texts), "--json"],
        );
        assert!(
            out.status.success(),
            "rm-score {name} texts: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = json_lines(&out.stdout);
        let want = r["texts"].as_array().unwrap();
        assert_eq!(lines.len(), want.len());
        for (i, (l, w)) in lines.iter().zip(want).enumerate() {
            close(
                l["score"].as_f64().unwrap(),
                w["score"].as_f64().unwrap(),
                tol,
                &format!("rm-score {name} text {i}"),
            );
        }

        let pairs = seq_cls().join("pairs.jsonl");
        let out = run(
            "rm-score",
            &["--model", s(&dir), "--data", s(&pairs), "--json"],
        );
        assert!(
            out.status.success(),
            "rm-score {name} pairs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines = json_lines(&out.stdout);
        let want = r["pairs"].as_array().unwrap();
        assert_eq!(lines.len(), want.len());
        for (i, (l, w)) in lines.iter().zip(want).enumerate() {
            for side in ["chosen", "rejected"] {
                close(
                    l[side].as_f64().unwrap(),
                    w[format!("{side}_score")].as_f64().unwrap(),
                    tol,
                    &format!("rm-score {name} pair {i} {side}"),
                );
            }
        }
        // the plain (non-JSON) pair output is the accuracy line
        let out = run("rm-score", &["--model", s(&dir), "--data", s(&pairs)]);
        assert!(out.status.success());
        assert!(String::from_utf8_lossy(&out.stdout).starts_with("accuracy "));
    }
}

/// Text pairs whose chosen completion says "yes" where the rejected one says "no".
fn pairs_file(path: &Path, n: usize, seed: u64) {
    let words = [
        "apple", "river", "stone", "cloud", "green", "quick", "slow", "table",
    ];
    let mut state = seed;
    let mut pick = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        words[(state >> 33) as usize % words.len()]
    };
    let mut lines = String::new();
    for _ in 0..n {
        let prompt = format!("{} {}:", pick(), pick());
        let body = pick();
        lines += &json!({"prompt": prompt, "chosen": format!(" {body} yes"), "rejected": format!(" {body} no")}).to_string();
        lines.push('\n');
    }
    std::fs::write(path, lines).unwrap();
}

#[test]
fn rm_train_full_folder_loads_with_rm_train_scores() {
    let tmp = tempfile::tempdir().unwrap();
    let (train, val) = (tmp.path().join("train.jsonl"), tmp.path().join("val.jsonl"));
    pairs_file(&train, 16, 7);
    pairs_file(&val, 5, 99);
    let out = tmp.path().join("rm-full");
    let log = tmp.path().join("rm-full.jsonl");
    let base = fixtures().join("models").join("llama_gqa");
    let r = run(
        "rm-train",
        &[
            "--model",
            s(&base),
            "--data",
            s(&train),
            "--val-data",
            s(&val),
            "--out",
            s(&out),
            "--log",
            s(&log),
            "--method",
            "full",
            "--steps",
            "2",
            "--lr",
            "1e-3",
            "--batch",
            "4",
            "--quiet",
        ],
    );
    assert!(
        r.status.success(),
        "rm-train: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    // rm-train's held-out metrics after training, from its own in-memory model
    let evals: Vec<Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_some())
        .collect();
    let (first, last) = (&evals[0], evals.last().unwrap());
    assert_ne!(
        first["eval_rewards_chosen"], last["eval_rewards_chosen"],
        "training changed nothing"
    );

    let (model, mut state) = load_reward_model(&out, None).unwrap();
    assert!(model.config.seq_cls && model.lm_head.is_none());
    let tok = TextTokenizer::load(&out).unwrap();
    let pad = reward_pad(&model, &tok);
    assert_eq!(pad, Some(2), "rm-train writes the pad it trained with");
    let opts = PairOptions {
        max_len: 1024,
        drop_long: false,
        margin_column: None,
        skip_bad_lines: false,
    };
    let (pairs, _) = load_pairs(&val, &tok, &opts).unwrap();
    let n = pairs.len();
    let mut seqs: Vec<Vec<u32>> = pairs.iter().map(|p| p.chosen.ids.clone()).collect();
    seqs.extend(pairs.iter().map(|p| p.rejected.ids.clone()));
    let sc = score_sequences(&model, &mut state, &seqs, pad, 4).unwrap();
    let (c, rj): (Vec<f64>, Vec<f64>) = (0..n)
        .map(|k| (f64::from(sc[k]), f64::from(sc[k + n])))
        .unzip();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let loss = (0..n)
        .map(|k| (1.0 + (-(c[k] - rj[k])).exp()).ln())
        .sum::<f64>()
        / n as f64;
    let acc = (0..n).filter(|&k| c[k] > rj[k]).count() as f64 / n as f64;
    let tol = 1e-5;
    close(
        mean(&c),
        last["eval_rewards_chosen"].as_f64().unwrap(),
        tol,
        "mean chosen",
    );
    close(
        mean(&rj),
        last["eval_rewards_rejected"].as_f64().unwrap(),
        tol,
        "mean rejected",
    );
    close(loss, last["eval_loss"].as_f64().unwrap(), tol, "loss");
    assert_eq!(acc, last["eval_accuracy"].as_f64().unwrap());

    // rm-score on the folder gives the same per-pair scores
    let r = run(
        "rm-score",
        &["--model", s(&out), "--data", s(&val), "--json"],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let lines = json_lines(&r.stdout);
    assert_eq!(lines.len(), n);
    for (k, l) in lines.iter().enumerate() {
        close(l["chosen"].as_f64().unwrap(), c[k], 1e-6, "rm-score chosen");
        close(
            l["rejected"].as_f64().unwrap(),
            rj[k],
            1e-6,
            "rm-score rejected",
        );
    }
}

type RawTensors = Vec<(String, (safetensors::Dtype, Vec<usize>, Vec<u8>))>;

fn read_raw(p: &Path) -> RawTensors {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn write_raw(p: &Path, raw: &RawTensors) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = raw
        .iter()
        .map(|(n, (dt, shape, bytes))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dt, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    std::fs::write(p, safetensors::tensor::serialize(views, None).unwrap()).unwrap();
}

/// A copy of the Llama folder changed by `edit` (tensors) and `cfg` (config.json).
fn edited_folder(
    tmp: &Path,
    name: &str,
    edit: impl FnOnce(&mut RawTensors),
    cfg: impl FnOnce(&mut Value),
) -> PathBuf {
    let dir = tmp.join(name);
    copy_dir(&seq_cls().join("llama"), &dir);
    let st = dir.join("model.safetensors");
    let mut raw = read_raw(&st);
    edit(&mut raw);
    write_raw(&st, &raw);
    let mut c = read_json(&dir.join("config.json"));
    cfg(&mut c);
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    dir
}

fn expect_error(dir: &Path, needle: &str) {
    let e = match load_reward_model(dir, None) {
        Ok(_) => panic!("{} loaded as a reward model", dir.display()),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(needle), "{e:?} does not mention {needle:?}");
    assert!(!e.contains('\n'), "{e:?} is not one line");
    let texts = seq_cls().join("texts.jsonl");
    let out = run("rm-score", &["--model", s(dir), "--data", s(&texts)]);
    assert_clean_error(&out, needle);
}

#[test]
fn folders_that_are_not_one_label_reward_models_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    // num_labels 2 (what transformers writes: score.weight [2, hidden], two id2label entries)
    let two = edited_folder(
        tmp.path(),
        "two-labels",
        |raw| {
            let (_, (_, shape, bytes)) = raw.iter_mut().find(|(n, _)| n == "score.weight").unwrap();
            *shape = vec![2, shape[1]];
            *bytes = bytes.repeat(2);
        },
        |c| {
            c["id2label"] = json!({"0": "LABEL_0", "1": "LABEL_1"});
            c["label2id"] = json!({"LABEL_0": 0, "LABEL_1": 1});
        },
    );
    expect_error(
        &two,
        "score.weight has shape [2, 64] (num_labels 2): a reward model needs one label",
    );
    // a head with a bias
    let bias = edited_folder(
        tmp.path(),
        "bias",
        |raw| {
            let bytes = vec![0u8; 2];
            raw.push((
                "score.bias".into(),
                (safetensors::Dtype::BF16, vec![1], bytes),
            ));
        },
        |_| {},
    );
    expect_error(&bias, "score.bias");
    // no score head at all
    let none = edited_folder(
        tmp.path(),
        "no-score",
        |raw| raw.retain(|(n, _)| n != "score.weight"),
        |_| {},
    );
    expect_error(&none, "tensor score.weight is missing");
    // a causal LM without --adapter: says what was found and where an adapter goes
    let lm = fixtures().join("models").join("llama_gqa");
    expect_error(&lm, "architectures[0] is LlamaForCausalLM");
    let out = run(
        "rm-score",
        &[
            "--model",
            s(&lm),
            "--data",
            s(&seq_cls().join("texts.jsonl")),
        ],
    );
    assert_clean_error(&out, "--adapter");
}
