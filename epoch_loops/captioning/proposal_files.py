"""Proposal generator checkpoints: BMT's `best_prop_model.pt` layout (ours and the released file), and the
captioning checkpoints its encoder starts from (our agent folder, or BMT's `best_cap_model.pt`).

`best_prop_model.pt` is a dict {config, epoch, model_state_dict, optimizer_state_dict,
scheduler_state_dict, anchors, val_anet_metrics, best_metric}. BMT's files pickle `config` as an instance of its
class `utilities.config_constructor.Config` and the anchors as numpy float scalars; ours store plain data under
the same keys. Every file is loaded with `torch.load(weights_only=True)` and an explicit allow-list
(`BMT_SAFE_GLOBALS`): torch's tensor classes, numpy scalars and float dtypes (numpy 1 and 2 module names),
`_codecs.encode`, and BMT's Config class mapped onto `StoredConfig`, a class without behaviour whose fields are
read back as a plain dict. Any other pickled object is refused before anything in the file runs. Both torch's
legacy format (BMT's torch 1.2) and the zip format load. The stored config's `device` and
`pretrained_cap_model_path` are never read: the weights are in the file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.captioning.proposals import PAD_ROWS
from epoch_loops.captioning.agent_files import load_agents
from model.captioning.proposals import (
    MODALITIES,
    STRIDES,
    ProposalConfig,
    ProposalGenerator,
)
from utilities.checkpoint import load_checkpoint, load_model_state
from utilities.errors import InputError

log = logging.getLogger(__name__)

PROP_FILE = "best_prop_model.pt"
BMT_CONFIG_CLASS = "utilities.config_constructor.Config"


class StoredConfig:
    """Receives the fields of a pickled BMT Config (the unpickler sets its `__dict__`; nothing else runs)."""


def _numpy_scalar_reconstructor():
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    return core.multiarray.scalar


BMT_SAFE_GLOBALS: list[Any] = [
    (StoredConfig, BMT_CONFIG_CLASS),
    (_numpy_scalar_reconstructor(), "numpy.core.multiarray.scalar"),
    (_numpy_scalar_reconstructor(), "numpy._core.multiarray.scalar"),
    np.dtype,
    *(type(np.dtype(t)) for t in ("float16", "float32", "float64")),
]


def load_bmt_file(path: str | Path) -> dict[str, Any]:
    """A BMT-layout checkpoint as plain data: the Config object becomes a dict, numpy scalars Python numbers."""
    return _plain(load_checkpoint(path, safe_globals=BMT_SAFE_GLOBALS))


def _plain(value: Any) -> Any:
    if isinstance(value, StoredConfig):
        return _plain(vars(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value


# The stored config's fields the generator's shape depends on, with the only values we build.
FIXED_SETTINGS = {"modality": "audio_video", "use_linear_embedder": False, "layer_norm": False}


# ProposalConfig field ← the BMT config field it is read from.
BMT_ENCODER_FIELDS = {
    "d_vid": "d_model_video",
    "d_aud": "d_model_audio",
    "d_model": "d_model",
    "H": "H",
    "N": "N",
    "d_ff_vid": "d_ff_video",
    "d_ff_aud": "d_ff_audio",
}


def bmt_encoder_sizes(stored: Mapping[str, Any], source: str) -> dict[str, int]:
    """The bimodal encoder's sizes in a BMT config (`best_prop_model.pt` or `best_cap_model.pt`), as
    `ProposalConfig` fields; a missing or non-integer field is one line naming `source` and the field."""
    sizes = {}
    for field, bmt_field in BMT_ENCODER_FIELDS.items():
        try:
            sizes[field] = int(stored[bmt_field])
        except KeyError:
            raise InputError(f"{source}: its config has no {bmt_field!r} (the encoder's sizes)") from None
        except (TypeError, ValueError):
            raise InputError(
                f"{source}: config {bmt_field} = {stored[bmt_field]!r} is not an integer"
            ) from None
    return sizes


def proposal_config(stored: Mapping[str, Any], anchors: Mapping[str, Any], source: str) -> ProposalConfig:
    """The generator's sizes from a `best_prop_model.pt` config (BMT's field names) and its anchors."""
    try:
        for name, value in FIXED_SETTINGS.items():
            if stored.get(name, value) != value:
                raise InputError(
                    f"{source}: config {name} = {stored[name]!r} is not supported (only {value!r})"
                )
        for name, table in (("strides", STRIDES), ("pad_feats_up_to", PAD_ROWS)):
            given = stored.get(name, table)
            if any(abs(float(given[m]) - table[m]) > 1e-6 for m in MODALITIES):
                raise InputError(f"{source}: config {name} = {given} differs from the original's {table}")
        return ProposalConfig(
            **bmt_encoder_sizes(stored, source),
            dout_p=float(stored.get("dout_p", 0.1)),
            conv_layers_audio=tuple(int(w) for w in stored["conv_layers_audio"]),
            conv_layers_video=tuple(int(w) for w in stored["conv_layers_video"]),
            kernel_sizes_audio=tuple(int(k) for k in stored["kernel_sizes"]["audio"]),
            kernel_sizes_video=tuple(int(k) for k in stored["kernel_sizes"]["video"]),
            obj_coeff=float(stored.get("obj_coeff", 1)),
            noobj_coeff=float(stored.get("noobj_coeff", 100)),
            anchors={m: tuple(float(a) for a in anchors[m]) for m in MODALITIES},
        )
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{source}: config or anchors incomplete for a proposal generator ({e!r})") from None


def stored_config(cfg: ProposalConfig, **extra: Any) -> dict[str, Any]:
    """`proposal_config`'s inverse: the BMT field names the generator's shape is read back from."""
    return {
        **FIXED_SETTINGS,
        "d_model_video": cfg.d_vid,
        "d_model_audio": cfg.d_aud,
        "d_vid": cfg.d_vid,
        "d_aud": cfg.d_aud,
        "d_model": cfg.d_model,
        "H": cfg.H,
        "N": cfg.N,
        "d_ff_video": cfg.d_ff_vid,
        "d_ff_audio": cfg.d_ff_aud,
        "dout_p": cfg.dout_p,
        "conv_layers_audio": list(cfg.conv_layers_audio),
        "conv_layers_video": list(cfg.conv_layers_video),
        "kernel_sizes": {"audio": list(cfg.kernel_sizes_audio), "video": list(cfg.kernel_sizes_video)},
        "anchors_num_audio": len(cfg.anchors["audio"]),
        "anchors_num_video": len(cfg.anchors["video"]),
        "obj_coeff": cfg.obj_coeff,
        "noobj_coeff": cfg.noobj_coeff,
        "strides": dict(STRIDES),
        "pad_feats_up_to": dict(PAD_ROWS),
        **extra,
    }


def load_proposal_generator(path: str | Path) -> tuple[ProposalGenerator, dict[str, Any]]:
    """A `best_prop_model.pt` (ours or BMT's) → the generator with its weights (strict), and the file's dict."""
    state = load_bmt_file(path)
    missing = [k for k in ("config", "model_state_dict", "anchors") if k not in state]
    if missing:
        raise InputError(
            f"{path}: not a proposal generator checkpoint (no {', '.join(missing)}; expected BMT's "
            f"{PROP_FILE} layout)"
        )
    model = ProposalGenerator(proposal_config(state["config"], state["anchors"], str(path)))
    weights = {k.removeprefix("module."): v for k, v in state["model_state_dict"].items()}
    load_model_state(model, weights, str(path))
    return model, state


def proposal_checkpoint(
    model: ProposalGenerator,
    epoch: int,
    optimizer: torch.optim.Optimizer | None,
    metrics: dict | None,
    best_metric: float | None,
    **config_extra: Any,
) -> dict[str, Any]:
    """The original's `best_prop_model.pt` dict, with the config as plain data."""
    return {
        "config": stored_config(model.cfg, **config_extra),
        "epoch": epoch,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": None if optimizer is None else optimizer.state_dict(),
        "scheduler_state_dict": None,
        "anchors": {m: list(model.cfg.anchors[m]) for m in MODALITIES},
        "val_anet_metrics": metrics,
        "best_metric": best_metric,
    }


def encoder_from_captioning(cfg) -> tuple[ProposalConfig, dict[str, torch.Tensor]]:
    """The generator's encoder sizes and weights (BMT key layout, M1 = audio) from a captioning checkpoint:
    `--pretrained_cap_model_path` (BMT's `best_cap_model.pt`) or `--rl_pretrained_model_dir` (our agent folder
    or a released BMHRL one: its encoder has M1 = video, so the stream names are swapped)."""
    if getattr(cfg, "pretrained_cap_model_path", None):
        path = cfg.pretrained_cap_model_path
        state = load_bmt_file(path)
        if "model_state_dict" not in state or "config" not in state:
            raise InputError(f"--pretrained_cap_model_path {path}: not BMT's best_cap_model.pt layout")
        stored = state["config"]
        sizes = ProposalConfig(**bmt_encoder_sizes(stored, f"--pretrained_cap_model_path {path}"))
        prefix = "encoder."
        weights = {
            k.removeprefix("module.").removeprefix(prefix): v
            for k, v in state["model_state_dict"].items()
            if k.removeprefix("module.").startswith(prefix + "encoder_AV.")
        }
        return sizes, weights
    if not cfg.rl_pretrained_model_dir:
        raise InputError(
            "train_prop needs a captioning checkpoint for its encoder: --rl_pretrained_model_dir DIR or "
            "--pretrained_cap_model_path best_cap_model.pt (BMT's release: README 'Where to get the real things')"
        )
    agent = load_agents(cfg, cfg.rl_pretrained_model_dir, with_value_functions=False).agent
    if agent.cfg.mode != "BMHRL":
        raise InputError(f"--rl_pretrained_model_dir: a {agent.cfg.mode} agent has no bimodal encoder")
    a = agent.cfg
    sizes = ProposalConfig(
        d_vid=a.d_vid,
        d_aud=a.d_aud,
        d_model=a.d_model,
        H=a.rl_att_heads,
        N=a.rl_att_layers,
        d_ff_vid=a.rl_ff_v,
        d_ff_aud=a.rl_ff_a,
        dout_p=a.dout_p,
    )
    swap = {"M1": "M2", "M2": "M1"}
    weights = {}
    for key, value in agent.bm_enc.state_dict().items():
        parts = key.split(".")  # encoder.layers.n.<module>_M1.…
        module = parts[3]
        stem, _, stream = module.rpartition("_")
        parts[3] = f"{stem}_{swap[stream]}"
        weights["encoder_AV." + ".".join(parts[1:])] = value
    return sizes, weights
