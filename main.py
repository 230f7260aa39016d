"""Command line of the framework: `python main.py --procedure NAME [--flags]`.

Flags keep the original BMT/BMHRL names where they exist, so the papers' command lines work. Everything below
this file takes a `Config`; nothing else parses the command line.
"""

from __future__ import annotations

import argparse
import os
import sys

from epoch_loops.procedures import PROCEDURES, TASK_PROCEDURES, help_groups, run_procedure
from utilities.config import (
    BoolFlag,
    Config,
    HelpFormatter,
    OneLineErrorParser,
    below_one,
    config_from_argv,
    finite_float,
    non_negative_float,
    non_negative_int,
    open_unit,
    positive_float,
    positive_int,
    probability,
    tiou,
)
from utilities.errors import InputError, ToolError, TrainingError
from utilities.run_dir import is_rank0, launched_world_size

# The flag groups, in the order the full help prints them. A procedure's registry entry names the groups it reads
# (epoch_loops/procedures.py), and `--procedure NAME --help` prints only those: a new flag joins one group here.
GROUPS: dict[str, str] = {
    "run": "every procedure",
    "task": "--task picks what eval scores, or LR2PPO's LETOR variant of a procedure",
    "torchrun": "under torchrun",
    "captions": "the caption CSVs (ActivityNet Captions segments)",
    "features": "the video and audio features' kind and widths",
    "feature_files": "where the features are",
    "vocabulary": "the caption vocabulary and word vectors",
    "loader": "data loading",
    "packing": "pack_features",
    "output": "the file pack_features or plot writes",
    "plot": "plot",
    "watching": "per-step TensorBoard scalars of a training run",
    "precision": "mixed precision (train_rl_cap, the LR2PPO stages)",
    "demo": "the built-in demo dataset",
    "agent": "the BMHRL captioning agent",
    "decoding": "how captions are decoded",
    "epochs": "the captioning training loops",
    "clipping": "every training loop",
    "early_stopping": "train_rl_cap, train_prop",
    "captioner_training": "the captioner's optimisation (train_rl_cap)",
    "RL": "the RL epochs of train_rl_cap",
    "predict": "captioning one video",
    "proposals": "the event proposal generator's output",
    "proposal_training": "train_prop",
    "critic": "the segment critic's decision",
    "critic_training": "train_critic",
    "ranking_model": "LR2PPO's models",
    "ranking_data": "LR2PPO's clip lists and features",
    "ranking_checkpoint": "the ranking model a procedure starts from or reads",
    "ranking_batches": "LR2PPO's batches",
    "ranking_training": "LR2PPO's stages",
    "PPO": "LR2PPO's stage 3",
    "ranking_evaluation": "ranking metrics and outputs",
    "export": "export_ranking",
    "LETOR": "LR2PPO's LETOR transfer (--task letor, letor_align): the folds",
    "alignment": "LETOR: the alignment model that projects every row",
    "LETOR_test": "LETOR: the target rows eval scores",
    "evaluation": "what eval scores, and against what",
    "metrics": "the metrics JSON",
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="main.py",
        description="RL on multimodal video data: BMHRL dense video captioning and LR2PPO label ranking.",
        formatter_class=HelpFormatter,
        allow_abbrev=False,  # `--config` is recognised by its full name before parsing
    )
    g = {name: parser.add_argument_group(name, about) for name, about in GROUPS.items()}
    g["run"].add_argument(
        "--procedure",
        required=True,
        choices=sorted(PROCEDURES),
        metavar="NAME",
        help="what to run (see --help)",
    )
    g["run"].add_argument(
        "--config", default=None, help="a saved run's config.json; explicit flags win over it"
    )
    g["run"].add_argument("--seed", type=int, default=0, help="seeds python, numpy, torch and the data order")
    g["run"].add_argument(
        "--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda:0'"
    )
    g["run"].add_argument(
        "--dry_run", action=BoolFlag, default=False, help="build data/model/optimiser, print a summary, exit"
    )
    g["run"].add_argument(
        "--resume",
        default=None,
        help="a checkpoint to resume training from (exact resume; training procedures)",
    )
    g["precision"].add_argument(
        "--amp",
        default=None,
        choices=["none", "bf16", "fp16"],
        help="mixed precision of the training forward passes (autocast; fp16 with a loss scaler); default: bf16 on "
        "a CUDA device that supports it, none otherwise",
    )
    g["captioner_training"].add_argument(
        "--compile", action=BoolFlag, default=False, help="torch.compile the trained module's forward"
    )
    g["torchrun"].add_argument(
        "--dist_timeout",
        type=positive_float,
        default=600.0,
        help="under torchrun: seconds a rank waits for the others in a collective before the job fails",
    )

    g["captions"].add_argument(
        "--train_meta_path", default="./data/train.csv", help="train segments (caption CSV)"
    )
    g["captions"].add_argument(
        "--val_1_meta_path", default="./data/val_1.csv", help="val_1 segments (caption CSV)"
    )
    g["captions"].add_argument(
        "--val_2_meta_path", default="./data/val_2.csv", help="val_2 segments (caption CSV)"
    )
    g["features"].add_argument(
        "--modality",
        default="audio_video",
        choices=["audio", "video", "audio_video"],
        help="which features a run reads",
    )
    g["feature_files"].add_argument(
        "--video_features_path",
        default="./data/i3d_25fps_stack64step64_2stream_npy/",
        help="directory of <vid>_rgb.npy/<vid>_flow.npy, or one packed .h5 file",
    )
    g["feature_files"].add_argument(
        "--audio_features_path",
        default="./data/vggish_npy/",
        help="directory of <vid>.npy, or one packed .h5",
    )
    g["features"].add_argument("--d_vid", type=positive_int, default=1024, help="raw video feature dimension")
    g["features"].add_argument("--d_aud", type=positive_int, default=128, help="raw audio feature dimension")
    g["feature_files"].add_argument(
        "--skip_missing_features",
        action=BoolFlag,
        default=False,
        help="drop segments whose features are missing",
    )
    g["vocabulary"].add_argument(
        "--word_emb_caps", default="./.vector_cache/glove.840B.300d.zip", help="GloVe .txt/.zip or 'random'"
    )
    g["agent"].add_argument(
        "--unfreeze_word_emb", action=BoolFlag, default=False, help="fine-tune the word embeddings"
    )
    g["vocabulary"].add_argument(
        "--vocab_path", default=None, help="an itos list (one token per line or JSON list) to load"
    )
    g["vocabulary"].add_argument(
        "--min_freq_caps",
        type=non_negative_int,
        default=1,
        help="minimum train frequency of a vocabulary word",
    )
    g["vocabulary"].add_argument(
        "--unk_token", default="<unk>", help="unknown-word token (the original's: ' UNK ')"
    )
    g["vocabulary"].add_argument("--start_token", default="<s>", help="start-of-caption token")
    g["vocabulary"].add_argument("--end_token", default="</s>", help="end-of-caption token")
    g["vocabulary"].add_argument("--pad_token", default="<blank>", help="padding token")
    g["loader"].add_argument(
        "--num_workers", type=non_negative_int, default=2, help="DataLoader worker processes"
    )
    g["packing"].add_argument(
        "--features_dir", default=None, help="pack_features: the directory of .npy files to pack"
    )
    g["output"].add_argument(
        "--out", default=None, help="pack_features: the .h5 file to write; plot: the PNG (default curves.png)"
    )
    g["packing"].add_argument(
        "--overwrite", action=BoolFlag, default=False, help="pack_features: replace an existing --out"
    )
    g["demo"].add_argument(
        "--demo_dir", default="./.cache/demo", help="where the built-in demo dataset is generated"
    )

    g["agent"].add_argument(
        "--mode",
        default="BMHRL",
        choices=["BMHRL", "AHRL", "VHRL", "BM", "eval"],
        help="the captioning agent: bimodal hierarchical, audio-only, video-only, bimodal without hierarchy; "
        "'eval' validates --rl_pretrained_model_dir (a BMHRL agent) without training",
    )
    g["vocabulary"].add_argument(
        "--d_model_caps", type=positive_int, default=300, help="caption width (= word embedding size)"
    )
    g["agent"].add_argument(
        "--d_model", type=positive_int, default=1024, help="inner width of every multi-head attention"
    )
    g["agent"].add_argument(
        "--rl_att_heads", type=positive_int, default=4, help="attention heads (encoder, fusion stacks)"
    )
    g["agent"].add_argument(
        "--rl_att_layers", type=positive_int, default=2, help="layers of the encoder and fusion stacks"
    )
    g["agent"].add_argument(
        "--rl_ff_v", type=positive_int, default=1024, help="feed-forward width of the video stream"
    )
    g["agent"].add_argument(
        "--rl_ff_a", type=positive_int, default=512, help="feed-forward width of the audio stream"
    )
    g["agent"].add_argument(
        "--rl_goal_d", type=positive_int, default=64, help="goal width (manager output, worker query)"
    )
    g["agent"].add_argument(
        "--rl_goal_att_heads",
        type=positive_int,
        default=2,
        help="heads of the worker's goal attention (fixed in the original)",
    )
    g["agent"].add_argument(
        "--dout_p", type=below_one, default=0.1, help="dropout probability everywhere in the agent"
    )
    g["agent"].add_argument(
        "--segmenter",
        default="critic",
        choices=["critic", "heuristic"],
        help="what marks sub-goal ends: the frozen segment critic (--rl_critic_path) or the punctuation and "
        "clause-word rule (no checkpoint needed)",
    )
    g["agent"].add_argument(
        "--rl_critic_path",
        default="./data/models/critic.cp",
        help="segment critic state dict (critic.cp layout)",
    )
    g["critic"].add_argument(
        "--rl_critic_score_threshhold",
        type=probability,
        default=0.25,
        help="a token ends a segment when sigmoid(critic logit) exceeds this",
    )
    g["agent"].add_argument(
        "--goal_timing",
        default="original",
        choices=["original", "aligned"],
        help="when the manager's new goal takes over after a segment-ending input: original = from the output "
        "after the next (the first word of the new clause still comes from the old goal, as the original), "
        "aligned = from the next output (README: the goal lag)",
    )
    g["agent"].add_argument(
        "--rl_pretrained_model_dir",
        default=None,
        help="a checkpoint folder with bm_hrl_agent.pt and the value functions (ours or the original's)",
    )

    g["epochs"].add_argument("--B", type=positive_int, default=16, help="train batch size")
    g["epochs"].add_argument(
        "--inf_B_coeff", type=positive_int, default=2, help="validation batch = inf_B_coeff × B"
    )
    g["epochs"].add_argument("--epoch_num", type=positive_int, default=100, help="epochs to train")
    g["captioner_training"].add_argument(
        "--rl_warmstart_epochs",
        type=non_negative_int,
        default=1,
        help="supervised warm-start epochs before RL (exactly this many)",
    )
    g["captioner_training"].add_argument(
        "--rl_cap_warmstart_lr", type=positive_float, default=1e-4, help="agent Adam lr in the warm start"
    )
    g["captioner_training"].add_argument(
        "--rl_cap_lr", type=positive_float, default=1e-4, help="agent Adam lr in the RL epochs"
    )
    g["captioner_training"].add_argument(
        "--weight_decay", type=non_negative_float, default=0.0, help="Adam weight decay of the agent"
    )
    g["captioner_training"].add_argument(
        "--smoothing",
        type=below_one,
        default=0.7,
        help="label smoothing of the warm-start loss (and biased_kl's ε)",
    )
    g["clipping"].add_argument(
        "--grad_clip",
        type=positive_float,
        default=None,
        help="clip the gradient norm to this before each step",
    )
    g["captioner_training"].add_argument(
        "--one_by_one_starts_at", type=non_negative_int, default=1, help="first epoch that is validated"
    )
    g["early_stopping"].add_argument(
        "--early_stop_after",
        type=positive_int,
        default=30,
        help="stop after this many validations without improvement",
    )
    g["decoding"].add_argument(
        "--max_len", type=positive_int, default=30, help="most tokens a decoded caption may have"
    )
    g["decoding"].add_argument(
        "--beam_size", type=positive_int, default=1, help="1: greedy decoding; more: beam search"
    )
    g["decoding"].add_argument(
        "--length_penalty",
        type=non_negative_float,
        default=1.0,
        help="beam search ranks by sum(log p) / length**this",
    )
    g["captioner_training"].add_argument(
        "--select_on",
        default="val_1",
        choices=["val_1", "mean"],
        help="the METEOR that selects checkpoints and drives early stopping: val_1 (as the paper's 10.80) or the "
        "mean of val_1 and val_2 (BMT's)",
    )
    g["captioner_training"].add_argument(
        "--scheduler",
        default="constant",
        choices=["constant", "reduce_on_plateau"],
        help="agent learning-rate schedule; reduce_on_plateau multiplies the lr by --lr_reduce_factor after "
        "--lr_patience validations without improvement of the --select_on METEOR",
    )
    g["captioner_training"].add_argument(
        "--lr_patience", type=non_negative_int, default=2, help="reduce_on_plateau: patience"
    )
    g["captioner_training"].add_argument(
        "--lr_reduce_factor", type=open_unit, default=0.5, help="reduce_on_plateau: factor"
    )

    g["RL"].add_argument(
        "--rl_value_function_lr",
        type=positive_float,
        default=1e-4,
        help="Adam lr of the worker and manager value functions",
    )
    g["RL"].add_argument(
        "--rl_objective",
        default="scst",
        choices=["scst", "biased_kl"],
        help="scst: self-critical sequence training on sampled captions with hierarchical credit; biased_kl: "
        "the original's reward-weighted label smoothing under teacher forcing (bugs fixed, README)",
    )
    g["RL"].add_argument(
        "--rl_reward",
        default="meteor",
        choices=["meteor", "cider"],
        help="sentence reward: METEOR 1.5 (the evaluation metric) or CIDEr-D with training-set document "
        "frequencies (for scst: METEOR pays for repeated words in sampled captions, README)",
    )
    g["RL"].add_argument(
        "--rl_samples", type=positive_int, default=5, help="scst: captions sampled per segment (K)"
    )
    g["RL"].add_argument(
        "--scst_baseline",
        default="greedy",
        choices=["greedy", "mean", "value"],
        help="scst: the reward subtracted from a sample's: the greedy caption's, the mean of the segment's "
        "other samples (needs --rl_samples >= 2), or the value functions' predictions",
    )
    g["RL"].add_argument(
        "--rl_train_worker",
        action=BoolFlag,
        default=True,
        help="the first RL epoch trains the worker (--no-rl_train_worker: the manager); RL epochs then "
        "alternate between the two, one module per epoch",
    )
    g["RL"].add_argument(
        "--rl_gamma_worker",
        type=probability,
        default=0.7,
        help="biased_kl: discount of the later ΔMETEOR rewards in a worker token's return (the original's "
        "intent; its code never applied it: 0 gives its plain per-token ΔMETEOR)",
    )
    g["RL"].add_argument(
        "--rl_gamma_manager",
        type=probability,
        default=0.8,
        help="discount of the sub-goal rewards that make a manager goal's return",
    )
    g["RL"].add_argument(
        "--rl_stabilize",
        action=BoolFlag,
        default=False,
        help="biased_kl: subtract the value function's prediction from the reward (a baseline)",
    )
    g["RL"].add_argument(
        "--compat_biased_kl_grad",
        action=BoolFlag,
        default=False,
        help="biased_kl: let the gradient flow through the reward amplitude in the target distribution, as "
        "the original did (a bug: it is not a policy gradient)",
    )

    g["predict"].add_argument("--video_id", default=None, help="predict: the video whose features are read")
    g["predict"].add_argument(
        "--duration", type=positive_float, default=None, help="predict: the video's duration (seconds)"
    )
    g["predict"].add_argument(
        "--timestamps",
        type=non_negative_float,
        nargs="+",
        default=None,
        metavar="S E",
        help="predict: segments to caption, start and end in seconds: S1 E1 [S2 E2 ...]",
    )
    g["predict"].add_argument(
        "--predictions_out", default=None, help='predict: write [{"start", "end", "sentence"}, ...] here'
    )

    g["proposals"].add_argument(
        "--prop_generator_model_path",
        default=None,
        help="a proposal generator checkpoint, best_prop_model.pt (ours or BMT's)",
    )
    g["predict"].add_argument(
        "--proposals_only",
        action=BoolFlag,
        default=False,
        help='predict: write the proposals [{"start", "end", "proposal_score"}] without captioning them',
    )
    g["proposals"].add_argument(
        "--nms_tiou_thresh",
        type=tiou,
        default=None,
        help="drop a proposal whose tIoU with a better-scored kept one reaches this (off by default)",
    )
    g["proposal_training"].add_argument(
        "--pretrained_cap_model_path",
        default=None,
        help="train_prop: BMT's best_cap_model.pt to take the encoder from (else --rl_pretrained_model_dir)",
    )
    g["proposal_training"].add_argument(
        "--prop_lr", type=positive_float, default=5e-5, help="train_prop: Adam lr"
    )
    for modality, anchors, kernels in (
        ("audio", 48, [5, 13, 23, 35, 51, 69, 91, 121, 161, 211]),
        ("video", 128, [1, 5, 9, 13, 19, 25, 35, 45, 61, 79]),
    ):
        g["proposal_training"].add_argument(
            f"--anchors_num_{modality}",
            type=positive_int,
            default=anchors,
            help=f"train_prop: {modality} anchors (k-means centres of the training segment lengths)",
        )
        g["proposal_training"].add_argument(
            f"--kernel_sizes_{modality}",
            type=positive_int,
            nargs="+",
            default=kernels,
            help=f"train_prop: one {modality} head per (odd) kernel size",
        )
        g["proposal_training"].add_argument(
            f"--conv_layers_{modality}",
            type=positive_int,
            nargs="+",
            default=[512, 512],
            help=f"train_prop: hidden widths of each {modality} head",
        )
    g["proposal_training"].add_argument(
        "--noobj_coeff", type=non_negative_float, default=100.0, help="train_prop: no-object BCE weight"
    )
    g["proposal_training"].add_argument(
        "--obj_coeff", type=non_negative_float, default=1.0, help="train_prop: object BCE weight"
    )
    g["proposal_training"].add_argument(
        "--finetune_cap_encoder",
        action=BoolFlag,
        default=False,
        help="train_prop: train the captioning encoder too (frozen by default)",
    )

    g["critic_training"].add_argument(
        "--critic_out",
        default=None,
        help="train_critic: also write the best critic.cp (original layout) here",
    )
    g["critic_training"].add_argument(
        "--critic_lr", type=positive_float, default=1e-3, help="train_critic: Adam learning rate"
    )
    g["critic_training"].add_argument(
        "--critic_pos_weight",
        type=positive_float,
        default=1.0,
        help="train_critic: BCE weight of boundary tokens; 1 keeps the probabilities calibrated for the agent's "
        "threshold (--rl_critic_score_threshhold 0.25 already leans to recall)",
    )
    g["evaluation"].add_argument(
        "--ranking_predictions",
        default=None,
        help='eval --task ranking: a predictions JSON [{"id", "scores": [...], "targets": [...]}, ...]',
    )
    g["ranking_evaluation"].add_argument(
        "--ndcg_empty_ideal",
        type=int,
        choices=[0, 1],
        default=1,
        help="NDCG of a clip without relevant labels (ideal DCG 0): 1 as LR2PPO/LightGBM, 0 as allRank",
    )
    add_ranking_flags(g)
    add_letor_flags(g)

    g["task"].add_argument(
        "--task",
        default="captioning",
        choices=["captioning", "proposals", "ranking", "letor", "letor_align"],
        help="eval: what to evaluate (proposals: detection P/R/F1 of learned proposals); letor: LR2PPO's LETOR "
        "transfer experiment for pointwise, reward, ppo, eval and data_summary; letor_align (pointwise): its "
        "alignment model",
    )
    g["evaluation"].add_argument(
        "--submission", default=None, help="eval: the predictions JSON (official format)"
    )
    g["evaluation"].add_argument(
        "--proposals", default=None, help='eval: a proposal file (BMT\'s format, {"results": {vid: [...]}})'
    )
    g["evaluation"].add_argument(
        "--reference_paths",
        nargs="+",
        default=["./data/val_1_no_missings.json", "./data/val_2_no_missings.json"],
        help="reference JSONs",
    )
    g["evaluation"].add_argument(
        "--tIoUs",
        type=tiou,
        nargs="+",
        default=[0.3, 0.5, 0.7, 0.9],
        help="tIoU thresholds a prediction must reach to be matched",
    )
    g["evaluation"].add_argument(
        "--max_prop_per_vid", type=positive_int, default=100, help="predictions kept per video"
    )
    g["evaluation"].add_argument("--soda", action=BoolFlag, default=False, help="also compute SODA_c")
    g["metrics"].add_argument("--metrics_out", default=None, help="also write the metrics JSON here")

    g["run"].add_argument("--log_dir", default="./log/", help="runs go to <log_dir>/<procedure>/<exp_name>/")
    g["run"].add_argument("--exp_name", default=None, help="run name; defaults to a timestamp")
    g["run"].add_argument("--progress", action=BoolFlag, default=True, help="tqdm bars (only on a TTY)")
    g["watching"].add_argument(
        "--log_every",
        type=non_negative_int,
        default=50,
        help="TensorBoard scalars train/<name> (loss, grad norm, lr, steps/s, the loop's statistics) averaged over "
        "every this many optimiser steps; 0: off (docs/watching-runs.md)",
    )
    g["plot"].add_argument(
        "--runs", nargs="+", default=None, metavar="DIR", help="run folders whose learning curves to draw"
    )
    return parser


def add_ranking_flags(g: dict[str, argparse._ArgumentGroup]) -> None:
    """LR2PPO's stages (pointwise, reward, ppo), their checkpoints and model sizes; the original's flag names."""
    g["ranking_data"].add_argument(
        "--train_path", default=None, help="training clip list (JSON; the pair file for reward)"
    )
    g["ranking_data"].add_argument(
        "--dev_path", default=None, help="validation clip list: selects the checkpoint"
    )
    g["ranking_data"].add_argument(
        "--test_path", default=None, help="test clip list: reported for the selected checkpoint"
    )
    g["ranking_data"].add_argument(
        "--features_h5", default=None, help="feature HDF5 (clean_feat.h5): text_emb, img_emb"
    )
    g["ranking_checkpoint"].add_argument(
        "--pretrained_model_path",
        default=None,
        help="pointwise: optional scorer to start from; reward: optional scorer whose trunk starts the reward "
        "model; ppo: the actor (stage-1 checkpoint); eval/export: the checkpoint (ours or a released .bin)",
    )
    g["PPO"].add_argument(
        "--reward_model_path", default=None, help="ppo: the reward model and critic (stage-2 checkpoint)"
    )
    g["ranking_training"].add_argument(
        "--learning_rate", type=positive_float, default=2e-5, help="AdamW peak lr (actor in ppo)"
    )
    g["PPO"].add_argument(
        "--critic_learning_rate",
        type=positive_float,
        default=1e-5,
        help="ppo: critic AdamW peak lr (the original's nominal 1e-3 was effectively <= 1.2e-5, docs/differences.md)",
    )
    g["ranking_training"].add_argument(
        "--ranking_weight_decay",
        type=non_negative_float,
        default=0.01,
        help="AdamW weight decay (0 for biases and norms)",
    )
    g["ranking_batches"].add_argument(
        "--batch_size", type=positive_int, default=32, help="clips (pointwise), pairs (reward, ppo)"
    )
    g["ranking_training"].add_argument(
        "--epochs_num", type=positive_int, default=3, help="passes over the training list"
    )
    g["ranking_training"].add_argument(
        "--report_steps",
        type=positive_int,
        default=100,
        help="pointwise/reward: validate every this many steps",
    )
    g["ranking_training"].add_argument(
        "--warmup",
        type=probability,
        default=0.1,
        help="fraction of the optimiser steps with linear lr warm-up",
    )
    g["ranking_training"].add_argument(
        "--max_tags",
        type=positive_int,
        default=32,
        help="pointwise: labels per training clip (cut or cycled); ppo: random label pairs per clip per epoch",
    )
    g["ranking_training"].add_argument(
        "--frame_order",
        default="random",
        choices=["random", "stored"],
        help="training frame order (evaluation always uses the stored order): random = the original's shuffle",
    )
    g["ranking_training"].add_argument(
        "--margin", type=non_negative_float, default=1.0, help="reward: margin of the ranking hinge loss"
    )
    g["ranking_training"].add_argument(
        "--reward_val_triplets",
        type=positive_int,
        default=100,
        help="reward: comparisons drawn per dev/test clip (one label of each level)",
    )
    g["PPO"].add_argument(
        "--ppo_objective",
        default="lr2ppo",
        choices=["lr2ppo", "clip"],
        help="lr2ppo: the paper's |advantage|-weighted pairwise hinge (bugs fixed); clip: ratio-clipped PPO "
        "over a Plackett-Luce ranking policy",
    )
    g["PPO"].add_argument(
        "--update_timesteps", type=positive_int, default=200, help="ppo: rollout batches collected per update"
    )
    g["PPO"].add_argument("--ppo_epochs", type=positive_int, default=1, help="ppo: passes over each rollout")
    g["PPO"].add_argument(
        "--minibatch_size",
        type=positive_int,
        default=None,
        help="ppo: pairs per update minibatch (None: --batch_size)",
    )
    g["PPO"].add_argument("--eps_clip", type=positive_float, default=0.2, help="ppo clip: ratio clip range")
    g["PPO"].add_argument(
        "--kl_div_loss_weight",
        type=non_negative_float,
        default=0.001,
        help="ppo: KL weight (lr2ppo: to the rollout policy, also taken off the reward; clip: to the initial "
        "policy)",
    )
    g["PPO"].add_argument(
        "--entropy_weight", type=non_negative_float, default=0.001, help="ppo: entropy bonus weight"
    )
    g["PPO"].add_argument(
        "--value_clip",
        type=positive_float,
        default=0.5,
        help="ppo: the critic's value moves at most this per rollout",
    )
    g["PPO"].add_argument(
        "--pl_temperature",
        type=positive_float,
        default=1.0,
        help="ppo clip: Plackett-Luce temperature on the scores",
    )
    g["PPO"].add_argument(
        "--advantage_threshold",
        type=finite_float,
        default=-0.1,
        help="ppo lr2ppo: keep the actor's order when the advantage is at least this, else swap it",
    )
    g["PPO"].add_argument(
        "--rank_margin",
        type=non_negative_float,
        default=0.01,
        help="ppo lr2ppo: margin of the pairwise score hinge",
    )
    g["ranking_evaluation"].add_argument(
        "--cases_out", default=None, help="eval: write per-clip scores, NDCG and predicted order here"
    )
    g["export"].add_argument("--export_path", default=None, help="export_ranking: the file to write")
    g["export"].add_argument(
        "--export_format",
        default="released",
        choices=["released", "ours"],
        help="export_ranking: released = the original's plain .bin state dict; ours = our checkpoint (with the "
        "model sizes), e.g. from a released .bin",
    )
    g["ranking_model"].add_argument(
        "--seq_length", type=positive_int, default=196, help="text tokens per label"
    )
    g["ranking_model"].add_argument("--max_imgs", type=positive_int, default=16, help="frame slots per clip")
    g["ranking_model"].add_argument(
        "--visual_feat_dim", type=positive_int, default=768, help="frame feature / model width"
    )
    g["ranking_model"].add_argument(
        "--text_feat_dim", type=positive_int, default=768, help="text token feature width"
    )
    g["ranking_model"].add_argument(
        "--feedforward_size", type=positive_int, default=3072, help="hidden width of every MLP"
    )
    g["ranking_model"].add_argument(
        "--xit_heads", type=positive_int, default=8, help="attention heads of the XiT blocks"
    )
    g["ranking_model"].add_argument(
        "--xit_dropout", type=below_one, default=0.1, help="dropout in the XiT blocks"
    )
    g["ranking_model"].add_argument(
        "--compat_xit_attention",
        action=BoolFlag,
        default=False,
        help="the original's attention (no logit scaling, probabilities divided by sqrt(dim)) for a model built "
        "from the flags; a released file runs with it unless --no-compat_xit_attention, ours with its saved mode",
    )
    g["ranking_model"].add_argument(
        "--scorer_head",
        default="flattened",
        choices=["flattened", "pooled"],
        help="flattened: the paper's (frame-order dependent); pooled: attention-pooled, order invariant",
    )


def add_letor_flags(g: dict[str, argparse._ArgumentGroup]) -> None:
    """The domains' data of LR2PPO's LETOR experiment; its stages take the ranking flags besides."""
    g["LETOR"].add_argument(
        "--source_dir",
        default=None,
        help="source dataset (MSLR-WEB10K): the folder holding Fold1/ ... Fold5/",
    )
    g["LETOR"].add_argument(
        "--target_dir", default=None, help="target dataset (MQ2008): the folder holding Fold1/ ..."
    )
    g["LETOR"].add_argument(
        "--fold", default="Fold1", help="the fold the three stages train, select and report on"
    )
    g["LETOR"].add_argument("--align_fold", default="Fold2", help="the fold the alignment model trains on")
    g["LETOR"].add_argument(
        "--limit_rows", type=positive_int, default=None, help="read only the first N rows of each train.txt"
    )
    g["LETOR"].add_argument(
        "--letor_cache_dir",
        default="./.cache/letor",
        help="packed HDF5 of every split read (reused while "
        "the text file keeps its size and modification time)",
    )
    g["LETOR"].add_argument(
        "--source_feat_dim",
        type=positive_int,
        default=136,
        help="letor_align: source rows' width (WEB10K 136)",
    )
    g["LETOR"].add_argument(
        "--target_feat_dim", type=positive_int, default=46, help="letor_align: target rows' width (MQ2008 46)"
    )
    g["alignment"].add_argument(
        "--alignment_model_path",
        default=None,
        help="the alignment model (ours or the original's .bin) whose input MLPs project every row",
    )
    g["LETOR_test"].add_argument(
        "--target_test_path", default=None, help="eval --task letor: raw target rows (svmlight)"
    )


# Widths that multi-head attention splits into equal heads: (width flag, heads flag).
HEADS_SPLIT = (
    ("d_model", "rl_att_heads"),
    ("d_model", "rl_goal_att_heads"),
    ("visual_feat_dim", "xit_heads"),
)


def check_combinations(parser: argparse.ArgumentParser, cfg: Config) -> None:
    """Flags whose values are valid alone but not together, refused before any work as argparse refuses a
    single bad value (the models would otherwise stop with a traceback once built)."""
    for width, heads in HEADS_SPLIT:
        if getattr(cfg, width) % getattr(cfg, heads):
            parser.error(
                f"--{width} {getattr(cfg, width)} is not divisible by --{heads} {getattr(cfg, heads)} "
                "(each attention head takes an equal share of the width)"
            )


def named_groups(parser: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    return {str(group.title): group for group in parser._action_groups}


def flags_of(parser: argparse.ArgumentParser, groups: tuple[str, ...]) -> list[argparse.Action]:
    """The flags of the named groups, in their order."""
    by_title = named_groups(parser)
    return [action for name in groups for action in by_title[name]._group_actions]


def procedure_help(parser: argparse.ArgumentParser, name: str, task: str | None) -> str:
    """`--procedure NAME --help`: a usage line, the procedure's summary, and only the groups it reads."""
    groups = help_groups(name, task)
    formatter = parser._get_formatter()
    variant = f" --task {task}" if (name, task) in TASK_PROCEDURES else ""
    formatter.add_usage(f"{parser.prog} --procedure {name}{variant} [flags]", [], [], prefix="usage: ")
    formatter.add_text(TASK_PROCEDURES.get((name, task), PROCEDURES[name]).summary)
    by_title = named_groups(parser)
    for title in groups:
        group = by_title[title]
        formatter.start_section(title)
        formatter.add_text(group.description)
        formatter.add_arguments(group._group_actions)
        formatter.end_section()
    return formatter.format_help()


def overview_help(parser: argparse.ArgumentParser) -> str:
    """`--help` without a procedure: the procedures, one line each, and how to see one's flags."""
    width = max(map(len, PROCEDURES)) + 2
    lines = [f"usage: {parser.prog} --procedure NAME [flags]", "", str(parser.description), "", "procedures:"]
    lines += [f"  {name:<{width}}{spec.summary}" for name, spec in sorted(PROCEDURES.items())]
    tasks = {task: [n for n, t in TASK_PROCEDURES if t == task] for _, task in TASK_PROCEDURES}
    variants = "; ".join(f"--task {task} for {', '.join(names)}" for task, names in tasks.items())
    lines += [
        "",
        f"python {parser.prog} --procedure NAME --help lists the flags NAME reads; add --task for a variant",
        f"({variants}).",
        "Booleans take --flag, --no-flag or --flag true|false; --config takes a run folder or its config.json.",
    ]
    return "\n".join(lines) + "\n"


def print_help(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Help for the procedure (and --task) named in argv, or the overview."""
    scout = OneLineErrorParser(prog=parser.prog, add_help=False, allow_abbrev=False)
    scout.add_argument("--procedure", choices=sorted(PROCEDURES))
    scout.add_argument("--task")
    named, _ = scout.parse_known_args(argv)
    if named.procedure is None:
        print(overview_help(parser), end="")
    else:
        print(procedure_help(parser, named.procedure, named.task), end="")


def warn_unread(parser: argparse.ArgumentParser, cfg: Config) -> None:
    """One line naming the flags given on the command line that the procedure does not read: accepted (a
    config file carries every setting, and a script may pass a superset), but a likely slip."""
    read = {
        action.dest for action in flags_of(parser, help_groups(cfg.procedure, getattr(cfg, "task", None)))
    }
    unread = sorted(cfg.given - read)
    if unread and is_rank0():  # under torchrun, once
        print(
            f"{parser.prog}: warning: --procedure {cfg.procedure} does not read "
            f"{', '.join('--' + flag for flag in unread)} (ignored; see --procedure {cfg.procedure} --help)",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print_help(parser, argv)
        return 0
    cfg = config_from_argv(parser, argv)
    check_combinations(parser, cfg)
    warn_unread(parser, cfg)
    try:
        return run_procedure(cfg)
    except (InputError, ToolError, TrainingError) as e:
        print(f"main.py: error: {rank_prefix()}{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"main.py: {e or 'interrupted'}", file=sys.stderr)
        return 130


def rank_prefix() -> str:
    """'rank R: ' under torchrun (torchrun ends the other ranks when one exits with an error), else ''."""
    return f"rank {os.environ['RANK']}: " if launched_world_size() > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
