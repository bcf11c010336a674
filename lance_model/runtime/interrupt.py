"""Host interrupts inside long work: forward pre-hooks that poll `cancel()` before a submodule runs.

One denoising step at 127k tokens or one VAE decode of a long clip takes minutes on CPU; checking between steps
is not enough. Hooks reach inside loops that live in other libraries (diffusers' Wan VAE calls its decoder once
per latent frame and its encoder once per chunk) without copying their code. The hooks exist only while a call
runs (session.running), and a `Cancelled` raised from them leaves no state behind that the next call could trip
over: the KV cache belongs to the call, and the session's task wrapper clears the VAE's frame cache and the
stores kept across runs after any failed or cancelled call.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import Cancelled


def check_cancel(cancel: Callable[[], bool] | None, where: str) -> None:
    if cancel is not None and cancel():
        raise Cancelled(f"cancelled during {where}")


@contextlib.contextmanager
def cancel_hooks(modules: Iterable[tuple[str, nn.Module]], cancel: Callable[[], bool] | None):
    """While active, each (where, module) polls `cancel` before every forward and raises Cancelled naming `where`."""
    if cancel is None:
        yield
        return
    handles = []
    try:
        for where, module in modules:
            handles.append(module.register_forward_pre_hook(_poller(cancel, where)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _poller(cancel: Callable[[], bool], where: str):
    def hook(module, args):
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            return  # never raise inside a CUDA graph capture (decode_step.py); the token loop polls anyway
        check_cancel(cancel, where)
    return hook
