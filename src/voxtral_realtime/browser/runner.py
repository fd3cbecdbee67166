"""Running an export on onnxruntime (CPU): the parity check of the page, which does the same in JavaScript.

:class:`OnnxEngine` replays the engine's protocol for one stream, one step at a time on the exported graphs; a
:class:`.streaming.StreamingSession` drives it as it drives :class:`..engine.Engine`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from .. import cpu_kernels
from ..audio import load_audio
from ..config import AudioConfig
from ..engine import Slot
from ..errors import VoxtralError, first_line
from ..protocol import closing_silence, prompt_ids
from ..streaming import StreamingSession
from ..tokenizer import Tokenizer
from .export import read_manifest, require_onnx


class WebExport:
    """An export folder loaded into onnxruntime (CPU): the model-like object :class:`.streaming.StreamingSession`
    needs (``config.audio``, ``tokenizer``), and :meth:`transcribe`, which runs the two step graphs exactly as
    the page does."""

    def __init__(self, folder: str | os.PathLike[str], *, verify: bool = True, threads: int | None = None) -> None:
        _, ort = require_onnx()
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder, verify=verify)
        a = self.manifest["audio"]
        audio = AudioConfig(sample_rate=a["sample_rate"], frame_rate=a["frame_rate"], hop_length=a["hop_length"],
                            window_size=a["window_size"], num_mel_bins=a["num_mel_bins"],
                            global_log_mel_max=a["global_log_mel_max"], downsample_factor=a["downsample_factor"],
                            transcription_delay_ms=a["transcription_delay_ms"],
                            n_left_pad_tokens=a["n_left_pad_tokens"])
        self.config = SimpleNamespace(audio=audio)
        self.tokenizer = Tokenizer(self.folder / "tekken.json")
        options = cpu_kernels.session_options(threads or torch.get_num_threads())
        self.sessions = {}
        for key, graph in self.manifest["graphs"].items():
            try:
                self.sessions[key] = ort.InferenceSession(str(self.folder / graph["file"]), options,
                                                          providers=["CPUExecutionProvider"])
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for unreadable graphs
                raise VoxtralError(f"{self.folder / graph['file']}: onnxruntime cannot load it "
                                   f"({first_line(exc)})") from None

    def engine_for_session(self) -> OnnxEngine:
        return OnnxEngine(self)

    def transcribe(self, audio: Any, *, delay_ms: int | None = None, sample_rate: int | None = None) -> Any:
        """Like :meth:`.api.Model.transcribe`, on the exported graphs."""
        samples = load_audio(audio, sample_rate=sample_rate)
        session = StreamingSession(self, delay_ms=delay_ms, track_latency=False)
        session.feed(samples)
        session.finish()
        return session.transcription


def step_agreement(export: WebExport, audio: Any, reference_tokens: Sequence[int], *,
                   delay_ms: int | None = None) -> float:
    """The fraction of ``reference_tokens`` (a transcription of ``audio``) that the export chooses when every
    step is fed the reference's previous token: a per-step measure of how far quantization moves the argmax."""
    samples = load_audio(audio)
    cfg, tok = export.config.audio, export.tokenizer
    delay = cfg.delay_tokens(delay_ms)
    chosen: list[int] = []

    class Recorder:
        def on_token(self, slot: Any, token: int) -> bool:
            chosen.append(token)
            return len(chosen) < len(reference_tokens)

    engine = OnnxEngine(export)
    engine.forced_tokens = list(reference_tokens)
    slot = engine.attach(Recorder())
    engine.reset(slot, prompt_ids(tok, cfg, delay), delay)
    engine.push(slot, np.concatenate([samples, closing_silence(cfg, delay, len(samples))]))
    engine.end(slot)
    engine.run()
    same = sum(a == b for a, b in zip(chosen, reference_tokens))
    return same / max(1, len(reference_tokens))


class GraphState:
    """The state tensors of one exported graph, by input name (numpy arrays from :meth:`reset`, or whatever a
    runner puts there), and the map from its outputs back to them."""

    def __init__(self, graph: dict) -> None:
        self.specs = graph["state"]
        self.values: dict[str, np.ndarray] = {}
        self.reset()

    def reset(self) -> None:
        self.values = {s["input"]: np.full(s["shape"], s["fill"], np.float32) for s in self.specs}

    def update(self, names: Sequence[str], results: Sequence[Any]) -> None:
        outputs = dict(zip(names, results))
        for s in self.specs:
            self.values[s["input"]] = outputs[s["output"]]


@dataclass(eq=False)
class _OnnxSlot(Slot):
    """The engine's slot (its embeddings are numpy arrays here) plus what the exported graphs take per step: the
    delay, and the last chosen token (fed back from the host: the graphs keep no buffer for it)."""

    delay_tokens: int = 0
    chosen: int = 0


class OnnxEngine:
    """The :class:`.engine.Engine` protocol for one stream, one step at a time, on the exported graphs: audio
    steps of ``step_window`` samples advancing by 80 ms, then one decoder position per audio embedding, the
    prompt's tokens first and each chosen token fed back afterwards."""

    def __init__(self, export: WebExport) -> None:
        self.export = export
        m = export.manifest
        self.step_samples = m["audio"]["samples_per_step"]
        self.step_window = m["audio"]["step_window"]
        self.frames_per_step = m["encoder"]["frames_per_step"]
        self.audio_state = GraphState(m["graphs"]["audio"])
        self.decoder_state = GraphState(m["graphs"]["decoder"])
        self._audio_session, self._decoder_session = export.sessions["audio"], export.sessions["decoder"]
        self._audio_outputs = [o.name for o in self._audio_session.get_outputs()]
        self._decoder_outputs = [o.name for o in self._decoder_session.get_outputs()]
        self.slot: _OnnxSlot | None = None
        #: tokens to feed back instead of the chosen ones (teacher forcing, to compare quantized exports step by
        #: step against a reference transcription without one early difference derailing all later steps)
        self.forced_tokens: list[int] | None = None

    def attach(self, client: Any) -> _OnnxSlot:
        if self.slot is not None:
            raise RuntimeError("an exported model runs one stream at a time")
        self.slot = _OnnxSlot(0, client)
        return self.slot

    def release(self, slot: _OnnxSlot) -> None:
        if self.slot is slot:
            self.slot = None

    def reset(self, slot: _OnnxSlot, prompt: list[int], delay_tokens: int) -> None:
        self.audio_state.reset()
        self.decoder_state.reset()
        slot.delay_tokens = delay_tokens
        slot.restart(prompt, self.export.config.audio)

    def push(self, slot: _OnnxSlot, samples: np.ndarray) -> None:
        slot.add_samples(samples)

    def end(self, slot: _OnnxSlot) -> None:
        slot.end_samples(self.export.config.audio)

    def has_work(self, slot: _OnnxSlot) -> bool:
        """Whether :meth:`run` would still compute something for ``slot``."""
        return len(slot.samples) >= self.step_window or slot.decodable() > 0

    def run(self) -> None:
        slot = self.slot
        if slot is None:
            return
        while len(slot.samples) >= self.step_window:
            self._audio_step(slot, slot.samples[:self.step_window])
            slot.samples = slot.samples[self.step_samples:]
            while slot.decodable():
                self._decoder_step(slot)
        while slot.decodable():
            self._decoder_step(slot)

    def _audio_step(self, slot: _OnnxSlot, window: np.ndarray) -> None:
        position = np.array([slot.encoder_position], np.int64)
        feeds = {"samples": np.ascontiguousarray(window), "position": position, **self.audio_state.values}
        results = self._audio_session.run(self._audio_outputs, feeds)
        self.audio_state.update(self._audio_outputs, results)
        slot.embeddings.append(results[0])
        slot.encoder_position += self.frames_per_step

    def _decoder_step(self, slot: _OnnxSlot) -> None:
        prompted = slot.position < len(slot.prompt)
        token = slot.prompt[slot.position] if prompted else slot.chosen
        generated = slot.position - len(slot.prompt)  # the generated token this position reads, if any
        if not prompted and self.forced_tokens is not None and generated < len(self.forced_tokens):
            token = self.forced_tokens[generated]
        feeds = {"token": np.array([token], np.int64), "audio": slot.embeddings.popleft(),
                 "position": np.array([slot.position], np.int64),
                 "delay": np.array([slot.delay_tokens], np.float32), **self.decoder_state.values}
        results = self._decoder_session.run(self._decoder_outputs, feeds)
        self.decoder_state.update(self._decoder_outputs, results)
        slot.position += 1
        if slot.position >= len(slot.prompt):
            slot.chosen = int(results[0][0])
            if not slot.client.on_token(slot, slot.chosen):
                slot.stopped = True
