//! Which curves go together: one panel per quantity, each with its training series and its
//! held-out (`eval_`) counterpart. The panels a log gets follow from the fields it has, so
//! the same table serves peft-train (loss, lr), rm-train and dpo-train (loss, accuracy, margin,
//! lr), ppo-train (score, KL, entropy, response length, lr) and grpo-train (reward, KL,
//! entropy, completion length, lr).

use super::metrics::Series;

/// A panel's title and the log fields it draws, in legend order.
const PANELS: &[(&str, &[&str])] = &[
    ("loss", &["loss", "eval_loss"]),
    ("reward accuracy", &["accuracy", "eval_accuracy"]),
    ("reward margin", &["margin", "eval_margin"]),
    ("score", &["score_mean", "rlhf_reward", "eval_score"]),
    ("reward", &["reward", "eval_reward"]),
    ("KL to the reference", &["kl", "eval_kl"]),
    ("entropy", &["entropy"]),
    (
        "response length",
        &["response_length", "eval_response_length"],
    ),
    ("learning rate", &["lr"]),
];

/// One chart panel: a title and the series drawn in it.
#[derive(Clone, Debug)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

/// The panels of the known fields present in `series` (each with at least one point).
pub fn panels(series: &[Series]) -> Vec<Panel> {
    PANELS
        .iter()
        .filter_map(|(title, fields)| {
            let found: Vec<Series> = fields
                .iter()
                .filter_map(|f| series.iter().find(|s| s.name == *f && !s.points.is_empty()))
                .cloned()
                .collect();
            (!found.is_empty()).then(|| Panel {
                title: title.to_string(),
                series: found,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(name: &str) -> Series {
        Series {
            name: name.into(),
            points: vec![(1.0, 1.0)],
        }
    }

    #[test]
    fn picks_the_panels_a_log_has() {
        let p = panels(&[s("lr"), s("loss"), s("grad_norm"), s("eval_loss")]);
        let titles: Vec<&str> = p.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles, ["loss", "learning rate"]);
        assert_eq!(p[0].series[1].name, "eval_loss");
        let p = panels(&[s("score_mean"), s("kl"), s("eval_kl")]);
        assert_eq!(p.len(), 2);
        let p = panels(&[s("reward"), s("eval_reward"), s("kl"), s("entropy")]);
        let titles: Vec<&str> = p.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(titles, ["reward", "KL to the reference", "entropy"]);
        assert!(panels(&[s("grad_norm")]).is_empty());
    }
}
