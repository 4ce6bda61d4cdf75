//! PPO arithmetic against TRL's code (tests/fixtures/generate_ppo_math.py: TRL 1.0.0's
//! experimental PPOv2 trainer and 0.11.4's legacy one, float64).

use peftkit_core::train::ppo_math::{
    entropy, gae, masked_mean, masked_var, masked_whiten, policy_loss, value_loss, KlController,
    KlEstimator,
};
use peftkit_tests::{fixtures, read_json};
use serde_json::Value;

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        Value::Number(n) => vec![n.as_f64().unwrap()],
        Value::Bool(b) => vec![f64::from(u8::from(*b))],
        _ => panic!("not numeric: {v}"),
    }
}

fn mask(v: &Value) -> Vec<bool> {
    flat(v).iter().map(|&x| x != 0.0).collect()
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(1.0),
            "{what}[{i}]: {x} vs {y}"
        );
    }
}

fn math() -> Value {
    read_json(&fixtures().join("ppo").join("math.json"))
}

#[test]
fn masked_statistics_and_whitening() {
    let m = &math()["masked_stats"];
    let (x, mk) = (flat(&m["values"]), mask(&m["mask"]));
    close(
        &[masked_mean(&x, &mk)],
        &[m["masked_mean"].as_f64().unwrap()],
        1e-12,
        "mean",
    );
    close(
        &[masked_var(&x, &mk, false)],
        &[m["masked_var_biased"].as_f64().unwrap()],
        1e-12,
        "var",
    );
    close(
        &[masked_var(&x, &mk, true)],
        &[m["masked_var_unbiased"].as_f64().unwrap()],
        1e-12,
        "unbiased var",
    );
    // TRL whitens every entry (masked ones too) with the masked statistics
    close(
        &masked_whiten(&x, &mk, true),
        &flat(&m["masked_whiten_shift_mean_true"]),
        1e-10,
        "whiten",
    );
    close(
        &masked_whiten(&x, &mk, false),
        &flat(&m["masked_whiten_shift_mean_false"]),
        1e-10,
        "whiten, mean kept",
    );
}

#[test]
fn kl_estimators() {
    let k = &math()["kl"];
    let (lp, rf) = (flat(&k["logprobs"]), flat(&k["ref_logprobs"]));
    for (name, est) in [
        ("k1", KlEstimator::K1),
        ("k3", KlEstimator::K3),
        ("abs", KlEstimator::Abs),
        ("mse", KlEstimator::Mse),
    ] {
        let got: Vec<f64> = lp
            .iter()
            .zip(&rf)
            .map(|(&a, &b)| est.estimate(a, b))
            .collect();
        close(&got, &flat(&k[name]), 1e-12, name);
    }
}

#[test]
fn gae_and_whitened_advantages() {
    let g = &math()["gae"];
    let values = flat(&g["inputs"]["values"]);
    let rewards = flat(&g["inputs"]["rewards"]);
    let len = g["inputs"]["values"][0].as_array().unwrap().len();
    let pad = mask(&g["inputs"]["padding_mask"]);
    let response: Vec<bool> = pad.iter().map(|&p| !p).collect();
    for case in ["gamma_1.0_lam_0.95", "gamma_0.9_lam_0.8"] {
        let c = &g[case];
        let (gamma, lam) = (c["gamma"].as_f64().unwrap(), c["lam"].as_f64().unwrap());
        let (adv, ret) = gae(&values, &rewards, len, gamma, lam);
        close(&adv, &flat(&c["advantages_raw"]), 1e-12, case);
        close(&ret, &flat(&c["returns"]), 1e-12, case);
        let mut white = masked_whiten(&adv, &response, true);
        close(&white, &flat(&c["advantages_whitened"]), 1e-10, case);
        white
            .iter_mut()
            .zip(&pad)
            .filter(|(_, &p)| p)
            .for_each(|(a, _)| *a = 0.0);
        close(&white, &flat(&c["advantages"]), 1e-10, case);
    }
}

#[test]
fn clipped_policy_loss_and_its_gradient() {
    let p = &math()["policy_loss"];
    let mk = mask(&p["mask"]);
    let l = policy_loss(
        &flat(&p["new_logprobs"]),
        &flat(&p["old_logprobs"]),
        &flat(&p["advantages"]),
        &mk,
        p["cliprange"].as_f64().unwrap(),
    );
    close(
        &[l.loss],
        &[p["pg_loss"].as_f64().unwrap()],
        1e-12,
        "pg_loss",
    );
    close(
        &[l.clipfrac],
        &[p["pg_clipfrac"].as_f64().unwrap()],
        1e-6,
        "clipfrac",
    );
    close(
        &[l.approx_kl],
        &[p["legacy_approxkl_masked"].as_f64().unwrap()],
        1e-12,
        "approx kl",
    );
    close(
        &l.grad,
        &flat(&p["grad_pg_loss_wrt_new_logprobs"]),
        1e-12,
        "grad",
    );
}

#[test]
fn clipped_value_loss_and_its_gradient() {
    let v = &math()["value_loss"];
    let mk: Vec<bool> = mask(&v["padding_mask_p1"]).iter().map(|&p| !p).collect();
    let coef = v["vf_coef"].as_f64().unwrap();
    let l = value_loss(
        &flat(&v["vpred"]),
        &flat(&v["values_old"]),
        &flat(&v["returns"]),
        &mk,
        v["cliprange_value"].as_f64().unwrap(),
        coef,
    );
    // TRL's vf_loss excludes vf_coef; ours includes it
    close(
        &[l.loss / coef],
        &[v["vf_loss"].as_f64().unwrap()],
        1e-12,
        "vf_loss",
    );
    close(
        &[l.clipfrac],
        &[v["vf_clipfrac"].as_f64().unwrap()],
        1e-6,
        "vf clipfrac",
    );
    let g: Vec<f64> = l.grad.iter().map(|x| x / coef).collect();
    close(&g, &flat(&v["grad_vf_loss_wrt_vpred"]), 1e-12, "vf grad");
}

#[test]
fn adaptive_kl_controller() {
    let c = &math()["kl_controller"]["adaptive"];
    let mut k = KlController {
        value: c["init_kl_coef"].as_f64().unwrap(),
        adaptive: Some((
            c["target"].as_f64().unwrap(),
            c["horizon"].as_f64().unwrap(),
        )),
    };
    for u in c["updates"].as_array().unwrap() {
        k.update(
            u["current"].as_f64().unwrap(),
            u["n_steps"].as_u64().unwrap() as usize,
        );
        close(
            &[k.value],
            &[u["value"].as_f64().unwrap()],
            1e-12,
            "kl coef",
        );
    }
}

#[test]
fn entropy_of_logits() {
    let e = &math()["entropy"];
    let logits = e["logits"].as_array().unwrap();
    let want = flat(&e["entropy"]);
    let mut got = Vec::new();
    for seq in logits {
        for row in seq.as_array().unwrap() {
            let r: Vec<f32> = flat(row).iter().map(|&x| x as f32).collect();
            got.push(entropy(&r));
        }
    }
    close(&got, &want, 1e-6, "entropy");
}
