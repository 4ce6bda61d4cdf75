//! Training: data pipeline, trainable parameters (PEFT methods and full/frozen fine-tuning),
//! a forward pass that keeps what the backward pass needs, hand-written backward passes,
//! loss, optimizer and checkpoints.

pub mod adapter_files;
mod attention;
pub mod backend;
pub mod bottleneck;
pub mod checkpoint;
pub mod data;
pub mod engine;
pub mod flops;
pub mod full;
pub mod grpo_math;
pub mod grpo_objective;
pub mod grpo_trainer;
pub mod ia3;
pub mod lora;
pub mod loss;
pub mod optim;
pub mod output;
pub mod pairs;
pub mod params;
pub mod plan;
pub mod plot;
pub mod policy_head;
pub mod ppo_math;
pub mod ppo_objective;
pub mod ppo_trainer;
pub mod pref_trainer;
pub mod preference;
pub mod prefix;
pub mod prompt;
pub mod prompts;
pub mod reward_command;
pub mod rewards;
pub mod rollout;
pub mod rollout_eval;
pub mod trainer;
