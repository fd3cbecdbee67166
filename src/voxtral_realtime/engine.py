"""The compute engine: runs the network for any number of concurrent streams, one slot per stream.

Streams join (:meth:`Engine.attach`) and leave (:meth:`Engine.release`) at any time; a stream only pushes audio
and receives tokens, and each :meth:`Engine.run` does all the work the pushed audio allows, for every stream.
docs/architecture.md ("The engine") describes the slots, the shared opening, the batched calls and their CUDA
graphs, and the pipelined decoder steps; docs/performance.md says why each is there.  A stream that stops at
step k (EOS) has had step k+1 computed for nothing (the pipelining); that result is dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from .config import AudioConfig
from .model import VoxtralRealtime
from .protocol import left_padding

#: Encoder frames per call when one stream has many steps waiting (a file fed at once), once it is past the
#: window: the ring holds window + chunk - 1 frames per stream, so engines for many streams use a small chunk,
#: and so does the CPU, where a long chunk gains no speed and costs ring memory (bench/results/README.md).
ENCODER_CHUNK_FRAMES = 1024
CPU_ENCODER_CHUNK_FRAMES = 64
SHARED_ENCODER_CHUNK_FRAMES = 16
#: Decoder positions per prefill call: covers the longest prompt (BOS + 32 pad + 30 delay steps at 2400 ms).
DECODER_CHUNK = 64
#: With CUDA graphs, a stream's prompt tokens are prefilled only when more than this many are left; fewer (after
#: the shared opening: 8 at the default 480 ms delay) take part in the graphed one-token steps, which are faster.
STEPPED_PROMPT_TOKENS = 8


class SlotClient(Protocol):
    def on_token(self, slot: Slot, token: int) -> bool:
        """A token was decided for ``slot``; return False to stop decoding it (e.g. after EOS)."""


@dataclass(eq=False)
class Slot:
    """One stream's place in the engine: its row in every state tensor and its progress through the network."""

    index: int
    client: SlotClient
    prompt: list[int] = field(default_factory=list)
    #: samples not yet turned into mel frames, starting at the next frame's left edge (CPU, float32)
    samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    samples_pushed: int = 0  # since the last reset, left padding included
    encoder_position: int = 0  # encoder frames done
    embeddings: deque[torch.Tensor] = field(default_factory=deque)  # audio embeddings [dim] not yet consumed
    position: int = 0  # decoder positions done = embeddings consumed
    embedding_limit: int | None = None  # how many embeddings may be consumed in all, once the audio has ended
    stopped: bool = False
    #: set before each token is delivered: the log-probabilities the model gave that token and, when the engine
    #: was told its id, the "nothing this step" token (``no_speech_id``)
    scores: tuple[float, float] | None = None

    def restart(self, prompt: list[int], audio: AudioConfig) -> None:
        """Empty the slot for a new segment opening with ``prompt``, the protocol's left padding queued."""
        self.prompt = list(prompt)
        # the first mel frame is centred on sample 0, so its window starts half a window before the signal
        self.samples = np.zeros(audio.window_size // 2, np.float32)
        self.samples_pushed = self.encoder_position = self.position = 0
        self.embeddings.clear()
        self.embedding_limit, self.stopped = None, False
        self.add_samples(left_padding(audio))

    def add_samples(self, samples: np.ndarray) -> None:
        self.samples = np.concatenate([self.samples, samples.astype(np.float32, copy=False)])
        self.samples_pushed += len(samples)

    def end_samples(self, audio: AudioConfig) -> None:
        """No more audio (the pushes end on a step boundary): complete the last mel frames; like the reference,
        the final audio embedding is not consumed."""
        self.embedding_limit = self.samples_pushed // audio.samples_per_token - 1
        self.samples = np.concatenate([self.samples, np.zeros(audio.window_size // 2, np.float32)])

    def decodable(self) -> int:
        if self.stopped:
            return 0
        n = len(self.embeddings)
        if self.embedding_limit is not None:
            n = min(n, self.embedding_limit - self.position)
        return max(0, n)


class Engine:
    """Batched streaming inference for up to ``max_streams`` concurrent streams of one network.

    ``decoder_context`` caps the decoder's attention window (and its KV memory) below the model's 8192 tokens
    (~11 min): with many streams the full window does not fit in memory.  Streams shorter than the cap are
    exact; longer ones attend to their last ``decoder_context`` tokens.  ``cuda_graphs`` (default: on for CUDA)
    captures the batched calls; ``compile`` first compiles them with ``torch.compile`` (fused elementwise
    kernels; a minute of compilation per batch-size bucket; an engine for one stream compiles its decoder step
    only).  An engine for several streams allocates its caches in full up front (the decoder's only when
    ``decoder_context`` bounds it), so it cannot run out of memory halfway through; with CUDA graphs the encoder's
    ring is allocated in full too.  ``no_speech_id`` (the tokenizer's ``[STREAMING_PAD]``): each delivered token's
    :attr:`Slot.scores` then hold that token's log-probability too (NaN without it).
    """

    def __init__(self, network: VoxtralRealtime, *, max_streams: int = 1, decoder_context: int | None = None,
                 encoder_chunk: int | None = None, cuda_graphs: bool | None = None, compile: bool = False,
                 no_speech_id: int | None = None) -> None:
        self.network = network
        #: (the network's layers_version, compiled): what this engine's compiled code and graphs were made for
        self.made_for = (network.layers_version, compile)
        cfg, device, dtype = network.config, network.device, network.dtype
        self.audio = cfg.audio
        self.max_streams = max_streams
        shared = max_streams > 1
        use_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # a compiled call is specialised to the cache sizes, a captured graph to the buffers: growing them would
        # mean compiling or capturing again
        preallocate = shared or compile
        if encoder_chunk is None:
            encoder_chunk = SHARED_ENCODER_CHUNK_FRAMES if shared else \
                CPU_ENCODER_CHUNK_FRAMES if device.type == "cpu" else ENCODER_CHUNK_FRAMES
        self.encoder_state = network.encoder.new_state(max_streams, max_chunk=encoder_chunk, device=device,
                                                       dtype=dtype, cache_dtype=network.cache_dtype,
                                                       preallocate=preallocate or use_graphs)
        self.decoder_cache = network.decoder.new_cache(max_streams, max_chunk=DECODER_CHUNK, device=device,
                                                       dtype=network.cache_dtype or dtype, context=decoder_context,
                                                       preallocate=compile or (shared and decoder_context is not None))
        self.ffn_scales = torch.zeros(max_streams, cfg.decoder.n_layers, cfg.decoder.dim, device=device, dtype=dtype)
        self.slots: list[Slot | None] = [None] * max_streams
        self._frames_per_step = self.audio.mel_frames_per_token
        self._step_samples = self.audio.samples_per_token
        # samples one step's mel frames read: the last frame's window reaches past the step's end
        self._step_window = (self._frames_per_step - 1) * self.audio.hop_length + self.audio.window_size
        self.shared = shared
        # inputs of the two batched calls, in fixed buffers so that captured graphs can read them
        # steps per stream of one batched encoder call: 1, 2, 4... up to what the encoder ring takes at once.  With
        # CUDA graphs one stream's waiting audio (a file) is encoded in such calls too, the largest first: each
        # size is captured once, and a chunk costs one graph launch instead of hundreds of kernel launches
        max_steps = max(1, self.encoder_state.cache.max_chunk // self.audio.downsample_factor)
        self._tick_steps = [2 ** i for i in range(max_steps.bit_length() - 1, -1, -1)] if shared or use_graphs \
            else [1]
        self._tick_samples = torch.zeros(max_streams, self._window(self._tick_steps[0]), device=device)
        self._tick_positions = torch.zeros(max_streams, dtype=torch.long, device=device)
        self._tick_enabled = torch.zeros(max_streams, dtype=torch.bool, device=device)
        # a step's per-row inputs go to the device in one copy, from (on CUDA) page-locked host memory: rows
        # 0-2 are tokens (-1: the token this row's previous step chose), positions and enabled per engine row;
        # row 3 lists the rows that take part.  Two host buffers alternate: while step k+1 is being prepared,
        # step k's copy may not have run yet.
        pinned = device.type == "cuda"
        self._step_host = [torch.zeros(4, max_streams, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self._step_inputs = torch.zeros(4, max_streams, dtype=torch.long, device=device)
        self._chosen = torch.zeros(max_streams, dtype=torch.long, device=device)  # each row's last token
        self._chosen_host = [torch.zeros(max_streams, dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        # each row's last step: log-probabilities of the chosen token and of no_speech_id, copied with the tokens
        self._no_speech_id = no_speech_id
        self._scores = torch.zeros(max_streams, 2, device=device)
        self._scores_host = [torch.zeros(max_streams, 2, pin_memory=pinned) for _ in range(2)]
        self._launched = 0  # decoder steps launched (picks the host buffers)
        self._step_audio = torch.zeros(max_streams, cfg.decoder.dim, device=device, dtype=dtype)
        self._encode_fn, self._decode_fn = self._encode_rows, self._decode_rows
        if compile:
            from torch import _dynamo

            # one compiled graph per bucket and per cache reallocation
            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
            if shared:  # one stream's encoder calls come in up to nine sizes: graphs alone, no compilations
                self._encode_fn = torch.compile(self._encode_rows, dynamic=False)
            self._decode_fn = torch.compile(self._decode_rows, dynamic=False)
        # a compiled call must be warm (compiled, guards settled) before capture: capture cannot compile
        self._graphs = _GraphedCalls(eager_calls=2 if compile else 1) if use_graphs else None
        self._buckets = _buckets(max_streams) if use_graphs else None
        self._stepped_prompt = STEPPED_PROMPT_TOKENS if use_graphs else 1
        self._ffn_cache: dict[int, torch.Tensor] = {}
        # the shared opening (docs/architecture.md, "The engine"): encoder rows + its embeddings, decoder rows per
        # prompt/delay
        hop, half = self.audio.hop_length, self.audio.window_size // 2
        last_silent_frame = (len(left_padding(self.audio)) - half) // hop
        self._silent_steps = max(0, (last_silent_frame + 1) // self._frames_per_step)
        self._encoder_opening: tuple[tuple, torch.Tensor] | None = None
        self._decoder_openings: dict[tuple[tuple[int, ...], int], object] = {}
        #: seconds spent per stage by run(), with device synchronisation (set to a dict to measure)
        self.stage_seconds: dict[str, float] | None = None
        #: decoder steps and batched rows so far (for statistics)
        self.decode_calls = 0
        self.decode_rows = 0
        self._decoder_calls_left: int | None = None  # what run() still allows

    # -- slots ------------------------------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Device memory held for the streams' state (KV caches, conv context, delay conditioning)."""
        caches = (self.encoder_state.cache, self.decoder_cache)
        scales = self.ffn_scales.numel() * self.ffn_scales.element_size()
        return sum(c.bytes_per_row() * c.rows for c in caches) + scales

    @property
    def free_slots(self) -> int:
        return sum(slot is None for slot in self.slots)

    def attach(self, client: SlotClient) -> Slot:
        """Give a new stream the lowest free row (so active rows stay packed and batches small); :meth:`reset`
        it before use."""
        try:
            index = self.slots.index(None)
        except ValueError:
            raise RuntimeError(f"all {self.max_streams} streams of this engine are busy") from None
        slot = Slot(index, client)
        self.slots[index] = slot
        return slot

    def release(self, slot: Slot) -> None:
        if self.slots[slot.index] is slot:
            self.slots[slot.index] = None

    def reset(self, slot: Slot, prompt: list[int], delay_tokens: int) -> None:
        """Start ``slot`` over with a new prompt: the protocol's left padding is already in, no audio yet."""
        row = slot.index
        self.ffn_scales[row] = self._ffn_rows(delay_tokens)
        slot.restart(prompt, self.audio)
        self._open(slot, delay_tokens)

    def _open(self, slot: Slot, delay_tokens: int) -> None:
        """Run (the first time) or copy (afterwards) the silent opening steps into ``slot``'s rows."""
        row, steps = slot.index, self._silent_steps
        self.encoder_state.reset(row)
        self.decoder_cache.reset(row)
        if not steps:
            return
        with torch.no_grad():
            if self._encoder_opening is None:
                self._encode_alone(slot, steps)
                self._encoder_opening = (self.encoder_state.snapshot(row, slot.encoder_position),
                                         torch.stack(list(slot.embeddings)))
            else:
                encoder_rows, embeddings = self._encoder_opening
                self.encoder_state.restore(row, encoder_rows)
                self._take_samples(slot, steps)
                slot.encoder_position = steps * self.audio.downsample_factor
                slot.embeddings.extend(embeddings)
            key = (tuple(slot.prompt[:steps]), delay_tokens)
            if key not in self._decoder_openings:
                self._prefill(slot, steps)
                self._decoder_openings[key] = self.decoder_cache.snapshot(row, steps)
            else:
                self.decoder_cache.restore(row, self._decoder_openings[key])
                for _ in range(steps):
                    slot.embeddings.popleft()
                slot.position = steps

    def push(self, slot: Slot, samples: np.ndarray) -> None:
        """Queue float32 16 kHz samples for ``slot`` (computed at the next :meth:`run`)."""
        slot.add_samples(samples)

    def has_work(self, slot: Slot | None = None) -> bool:
        """Whether :meth:`run` would still compute something for ``slot`` (default: for any stream)."""
        if slot is None:
            return any(s is not None and self.has_work(s) for s in self.slots)
        return self._encodable(slot) > 0 or slot.decodable() > 0

    def _encodable(self, slot: Slot) -> int:
        """Steps of ``slot`` the encoder would compute now.  A shared engine encodes no further ahead of the decoder
        than one call's worth (or the prompt's prefill): a bounded run (a server round) then also bounds the
        encoder work of a burst of audio (a stream's closing silence)."""
        steps = self._ready_steps(slot)
        if not self.shared or len(slot.embeddings) < max(self._tick_steps[0], len(slot.prompt) - slot.position):
            return steps
        return 0

    def end(self, slot: Slot) -> None:
        """No more audio for ``slot``: see :meth:`Slot.end_samples`."""
        slot.end_samples(self.audio)

    def capture_graphs(self) -> None:
        """Capture every bucket's graphs now (with every row disabled: nothing changes), so that no stream pays for
        a capture (or a compilation) later.  Without CUDA graphs this does nothing."""
        if self._graphs is None or self._buckets is None:
            return
        self._tick_enabled.zero_()
        self._step_inputs.zero_()
        self._step_inputs[0] = -1
        with torch.no_grad():
            for rows in self._buckets:
                for _ in range(3):  # eager warm-up calls, then the capture
                    for steps in self._tick_steps:
                        self._call(("encode", rows, steps), lambda rows=rows, n=steps: self._encode_fn(rows, n))
                    self._call(("decode", rows, 1), lambda rows=rows: self._decode_fn(rows))

    def _ffn_rows(self, delay_tokens: int) -> torch.Tensor:
        if delay_tokens not in self._ffn_cache:
            self._ffn_cache[delay_tokens] = self.network.decoder.ffn_scales(delay_tokens)
        return self._ffn_cache[delay_tokens]

    # -- work -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, max_decoder_calls: int | None = None) -> None:
        """Do everything the pushed audio allows for every stream (tokens go to the slots' clients), or stop after
        ``max_decoder_calls`` decoder calls (steps and prefills): a server bounds its rounds so that the streams
        closing with a burst of silence do not hold up the live ones; :meth:`has_work` says what is left."""
        self._decoder_calls_left = max_decoder_calls
        while self._timed("encode", self._encode) | self._timed("decode", self._decode):
            if self._decoder_calls_left == 0:
                break

    def _timed(self, stage: str, work: Callable[[], bool]) -> bool:
        if self.stage_seconds is None:
            return work()
        started = time.perf_counter()
        progressed = work()
        if self.network.device.type == "cuda":
            torch.cuda.synchronize()
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + time.perf_counter() - started
        return progressed

    def _ready_steps(self, slot: Slot) -> int:
        n = len(slot.samples)
        if n < self._step_window:
            return 0
        return 1 + (n - self._step_window) // self._step_samples

    def _take_samples(self, slot: Slot, steps: int) -> np.ndarray:
        need = self._window(steps)
        window = slot.samples[:need]
        slot.samples = slot.samples[steps * self._step_samples:]
        return window

    def _window(self, steps: int) -> int:
        """Samples the mel frames of ``steps`` steps read (the last frame's window reaches past the last step)."""
        return (steps - 1) * self._step_samples + self._step_window

    def _encode(self) -> bool:
        progressed = False
        while True:
            ready = [(slot, steps) for slot in self.slots if slot is not None and (steps := self._encodable(slot))]
            if not ready:
                return progressed
            progressed = True
            if not self.shared:
                slot, steps = ready[0]
                if self._graphs is not None:
                    self._encode_tick([slot], next(n for n in self._tick_steps if n <= steps))
                elif steps >= 2:
                    self._encode_alone(slot, steps)
                else:
                    self._encode_tick([slot], 1)
                continue
            most = max(steps for _, steps in ready)
            steps = next(n for n in self._tick_steps if n <= most)
            self._encode_tick([slot for slot, ready_steps in ready if ready_steps >= steps], steps)

    def _encode_alone(self, slot: Slot, steps: int) -> None:
        network, cache = self.network, self.encoder_state.cache
        factor = self.audio.downsample_factor
        while steps:
            chunk = min(steps, cache.max_write(slot.encoder_position) // factor)
            frames = chunk * factor
            samples = torch.from_numpy(self._take_samples(slot, chunk)).to(network.device)
            mel = network.mel.frames(samples)[None]
            positions = torch.arange(slot.encoder_position, slot.encoder_position + frames, device=network.device)
            cache.reserve(slot.encoder_position + frames)
            embeddings = network.embed_audio(mel, self.encoder_state, positions[None],
                                             rows=slice(slot.index, slot.index + 1))
            slot.encoder_position += frames
            slot.embeddings.extend(embeddings[0])
            steps -= chunk

    @torch.no_grad()
    def _encode_tick(self, slots: list[Slot], steps: int) -> None:
        """``steps`` steps of each of ``slots`` in one batched call."""
        frames = steps * self.audio.downsample_factor
        rows = self._rows(slots)
        self.encoder_state.cache.reserve(max(s.encoder_position for s in slots) + frames)
        windows = np.stack([self._take_samples(s, steps) for s in slots])
        index = torch.tensor([s.index for s in slots], device=self._tick_samples.device)
        self._tick_enabled.zero_()
        self._tick_enabled[index] = True
        self._tick_samples[:, :windows.shape[1]].index_copy_(
            0, index, torch.from_numpy(windows).to(self._tick_samples.device))
        self._tick_positions.index_copy_(
            0, index, torch.tensor([s.encoder_position for s in slots], device=index.device))
        out = self._call(("encode", rows, steps), lambda: self._encode_fn(rows, steps)).clone()
        for slot in slots:
            slot.encoder_position += frames
            slot.embeddings.extend(out[slot.index])

    def _encode_rows(self, rows: int, steps: int) -> torch.Tensor:
        network = self.network
        mel = network.mel.frames(self._tick_samples[:rows, :self._window(steps)])
        frames = steps * self.audio.downsample_factor
        positions = self._tick_positions[:rows, None] + torch.arange(frames, device=mel.device)
        return network.embed_audio(mel, self.encoder_state, positions, rows=slice(0, rows),
                                   enabled=self._tick_enabled[:rows])

    def _decode(self) -> bool:
        progressed = False
        pending: _LaunchedStep | None = None
        while self._decoder_calls_left != 0:
            batch: list[Slot] = []
            for slot in self.slots:
                if slot is None or not (available := slot.decodable()):
                    continue
                forced = len(slot.prompt) - slot.position
                if forced > self._stepped_prompt and available >= 2:
                    if self._decoder_calls_left == 0:
                        break
                    self._prefill(slot, min(forced, available))
                    self._count_decoder_call()
                    progressed = True
                else:
                    batch.append(slot)
            if not batch:
                break
            if self._decoder_calls_left == 0:
                break
            launched = self._launch_step(batch)
            self._count_decoder_call()
            if pending is not None:
                self._complete_step(pending)
            pending = launched
            progressed = True
        if pending is not None:
            self._complete_step(pending)
        return progressed

    def _count_decoder_call(self) -> None:
        if self._decoder_calls_left is not None:
            self._decoder_calls_left -= 1

    @torch.no_grad()
    def _prefill(self, slot: Slot, length: int) -> None:
        network, cache = self.network, self.decoder_cache
        length = min(length, cache.max_write(slot.position))
        device = network.device
        tokens = torch.tensor([slot.prompt[slot.position:slot.position + length]], device=device)
        audio = torch.stack([slot.embeddings.popleft() for _ in range(length)])[None]
        positions = torch.arange(slot.position, slot.position + length, device=device)[None]
        cache.reserve(slot.position + length)
        logits = network.decoder(tokens, audio, positions, cache, self.ffn_scales[slot.index:slot.index + 1],
                                 rows=slice(slot.index, slot.index + 1), columns_used=slot.position + length)
        slot.position += length
        if slot.position == len(slot.prompt):
            row = logits[0].reshape(1, -1)
            token = row[0].argmax()
            self._chosen[slot.index] = token
            slot.scores = tuple(self._token_scores(row, token.reshape(1))[0].tolist())
            self._deliver(slot, int(token))

    def _step(self, slots: list[Slot]) -> None:
        """One decoder step for ``slots``, unpipelined (tokens delivered before returning)."""
        self._complete_step(self._launch_step(slots))

    @torch.no_grad()
    def _launch_step(self, slots: list[Slot]) -> _LaunchedStep:
        """Queue one batched decoder step (one position for each of ``slots``) and the copy of its tokens to the
        host; nothing waits for the device."""
        rows = self._rows(slots)
        self.decoder_cache.reserve(max(s.position for s in slots) + 1)
        buffer = self._launched % 2
        self._launched += 1
        host_tensor = self._step_host[buffer]
        host = host_tensor.numpy()
        host[2, :rows] = 0
        delivered = []
        for i, slot in enumerate(slots):
            prompted = slot.position < len(slot.prompt)
            host[:3, slot.index] = (slot.prompt[slot.position] if prompted else -1, slot.position, 1)
            host[3, i] = slot.index
            slot.position += 1
            delivered.append(slot.position >= len(slot.prompt))
        self._step_inputs.copy_(host_tensor, non_blocking=True)
        self._step_audio.index_copy_(0, self._step_inputs[3, :len(slots)],
                                     torch.stack([s.embeddings.popleft() for s in slots]))
        self._call(("decode", rows, 1), lambda: self._decode_fn(rows))
        tokens = self._chosen_host[buffer]
        tokens[:rows].copy_(self._chosen[:rows], non_blocking=True)
        scores = self._scores_host[buffer]
        scores[:rows].copy_(self._scores[:rows], non_blocking=True)
        done = torch.cuda.Event() if self.network.device.type == "cuda" else None
        if done is not None:
            done.record()
        self.decode_calls += 1
        self.decode_rows += len(slots)
        return _LaunchedStep([s for s, d in zip(slots, delivered) if d], tokens, scores, done)

    def _complete_step(self, step: _LaunchedStep) -> None:
        """Wait for a launched step's tokens and deliver them (not to streams that stopped meanwhile)."""
        if step.done is not None:
            step.done.synchronize()
        tokens, scores = step.tokens.tolist(), step.scores.tolist()
        for slot in step.slots:
            if not slot.stopped:
                slot.scores = tuple(scores[slot.index])
                self._deliver(slot, tokens[slot.index])

    def _decode_rows(self, rows: int) -> torch.Tensor:
        inputs = self._step_inputs[:, :rows]
        enabled = inputs[2].bool()
        chosen = self._chosen[:rows]
        tokens = torch.where(inputs[0] >= 0, inputs[0], chosen)
        logits = self.network.decoder(tokens[:, None], self._step_audio[:rows, None], inputs[1, :, None],
                                      self.decoder_cache, self.ffn_scales[:rows], rows=slice(0, rows),
                                      enabled=enabled)
        new = _argmax(logits)
        chosen.copy_(torch.where(enabled, new, chosen))
        self._scores[:rows].copy_(torch.where(enabled[:, None], self._token_scores(logits, new), self._scores[:rows]))
        return chosen

    def _token_scores(self, logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """[B, V] logits, [B] chosen ids -> [B, 2]: log-probabilities of the chosen id and of ``no_speech_id``."""
        logits = logits.float()
        total = torch.logsumexp(logits, dim=-1, keepdim=True)
        picked = logits.gather(-1, chosen[:, None])
        no_speech = logits[:, self._no_speech_id, None] if self._no_speech_id is not None else \
            torch.full_like(picked, float("nan"))
        return torch.cat([picked, no_speech], dim=-1) - total

    def _deliver(self, slot: Slot, token: int) -> None:
        if not slot.client.on_token(slot, token):
            slot.stopped = True

    def _rows(self, slots: list[Slot]) -> int:
        """Rows a batched call covers: up to the highest busy row, rounded up to a bucket when graphs are used."""
        highest = max(s.index for s in slots) + 1
        if self._buckets is None:
            return highest
        return next(b for b in self._buckets if b >= highest)

    def _call(self, key: CallKey, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self._graphs is None:
            return fn()
        versions = (self.encoder_state.cache.version, self.decoder_cache.version)
        return self._graphs(key, versions, fn)


@dataclass
class _LaunchedStep:
    slots: list[Slot]  # the streams whose token this step decides (those past their prompt)
    tokens: torch.Tensor  # host buffer the step's chosen tokens are copied into, per engine row
    scores: torch.Tensor  # host buffer of their scores (Slot.scores), per engine row
    done: torch.cuda.Event | None  # recorded after that copy (CUDA)


#: a batched call's kind ("encode" / "decode"), rows and steps per row: one CUDA graph each
CallKey = tuple[str, int, int]


def _buckets(max_streams: int) -> list[int]:
    sizes, b = [], 1
    while b < max_streams:
        sizes.append(b)
        b *= 2
    return [*sizes, max_streams]


class _GraphedCalls:
    """Each batched call captured once per (kind, rows) into a CUDA graph, then replayed.

    The first calls of a shape run eagerly (the warm-up, and their results are used), the next captures it;
    capturing executes nothing.  A cache reallocation (``versions`` changes) drops every graph: they read the
    old buffers.
    """

    def __init__(self, eager_calls: int = 1) -> None:
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[CallKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._eager_calls = eager_calls
        self._seen: dict[CallKey, int] = {}
        self._versions: tuple[int, int] | None = None

    def __call__(self, key: CallKey, versions: tuple[int, int],
                 fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if versions != self._versions:
            # a memory pool dies with its last graph: the new graphs get a new one
            self._graphs.clear()
            self._seen.clear()
            self._pool = torch.cuda.graph_pool_handle()
            self._versions = versions
        if key in self._graphs:
            graph, out = self._graphs[key]
            graph.replay()
            return out
        if self._seen.get(key, 0) < self._eager_calls:
            self._seen[key] = self._seen.get(key, 0) + 1
            return fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        self._graphs[key] = (graph, out)
        graph.replay()
        return out

    def graph(self, key: CallKey) -> torch.cuda.CUDAGraph:
        return self._graphs[key][0]


def _argmax(logits: torch.Tensor, *, piece: int = 1024) -> torch.Tensor:
    """``logits.argmax(-1)`` [B, V] -> [B] (the first of equal maxima), in two reductions over pieces of the row,
    which spread a large vocabulary over the GPU where one argmax is a single program (docs/performance.md)."""
    rows, vocab = logits.shape
    if vocab % piece or vocab == piece:
        return logits.argmax(dim=-1)
    best, where = logits.view(rows, vocab // piece, piece).max(dim=-1)
    chosen = best.argmax(dim=-1, keepdim=True)
    return (chosen * piece + where.gather(-1, chosen))[:, 0]
