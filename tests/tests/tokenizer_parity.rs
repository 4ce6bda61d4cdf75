//! Tokenization, chat templates and decoding against transformers' fast tokenizers.

use peftkit_core::tokenizer::{Message, TextTokenizer};
use peftkit_tests::{
    fixtures, json_ids as ids, model_reference as reference, FIXTURE_MODELS as MODELS,
};

#[test]
fn encode_matches_transformers() {
    for name in MODELS {
        let tok = TextTokenizer::load(&fixtures().join("models").join(name)).unwrap();
        let r = reference(name);
        for s in r["samples"]
            .as_array()
            .unwrap()
            .iter()
            .chain(r["greedy"].as_array().unwrap())
        {
            let text = s
                .get("text")
                .or_else(|| s.get("prompt"))
                .unwrap()
                .as_str()
                .unwrap();
            assert_eq!(
                tok.encode(text).unwrap(),
                ids(&s["input_ids"]),
                "{name}: {text:?}"
            );
        }
    }
}

#[test]
fn chat_template_matches_transformers() {
    let mut checked = 0;
    for name in MODELS {
        let tok = TextTokenizer::load(&fixtures().join("models").join(name)).unwrap();
        let r = reference(name);
        let Some(chat) = r.get("chat") else { continue };
        let messages: Vec<Message> = serde_json::from_value(chat["messages"].clone()).unwrap();
        let rendered = tok.apply_chat_template(&messages, true).unwrap();
        assert_eq!(rendered, chat["rendered"].as_str().unwrap(), "{name}");
        assert_eq!(
            tok.encode_plain(&rendered).unwrap(),
            ids(&chat["input_ids"]),
            "{name}"
        );
        checked += 1;
    }
    assert!(checked >= 3, "chat fixtures checked: {checked}");
}

#[test]
fn decode_matches_transformers() {
    for name in MODELS {
        let tok = TextTokenizer::load(&fixtures().join("models").join(name)).unwrap();
        for d in reference(name)["decode"].as_array().unwrap() {
            assert_eq!(
                tok.decode(&ids(&d["ids"]), true).unwrap(),
                d["text"].as_str().unwrap(),
                "{name}"
            );
        }
    }
}
