"""Export the model for a browser page: ONNX graphs of one 80 ms streaming step, with every bit of state explicit.

Two graphs, each run once per 80 ms step (REFERENCE 6.4):

* ``audio_step.onnx``: the 1520 samples that one step's 8 mel frames read -> log-mel (the windowed DFT is a
  matmul) -> causal conv stem (its left context is state) -> one encoder block of 4 frames over a KV ring ->
  adapter -> one audio embedding.
* ``decoder_step.onnx``: token + audio embedding + position (+ delay) -> next token (greedy), over a KV ring.

State (conv tails, KV rings) goes in as inputs and comes back as outputs; the caller swaps them each step.  A ring
has a fixed number of columns; position ``p`` lives in column ``p % columns``.  Because a stream writes every
position once, in order, the position held by each column is implied by the current position, so the graphs
derive the attention mask from it (key j visible to query q iff q - window < j <= q, as :class:`.layers.KVCache`
does) and no position table travels between steps.  With ``columns = window + positions per call - 1`` nothing a
query still needs is ever overwritten, so the results equal the model's for streams of any length.

The page (and :class:`OnnxEngine` here, for the parity check) replays the engine's protocol for one stream.
Weights are ONNX external data in shards of at most 512 MB; ``q4``/``q8`` use onnxruntime's ``MatMulNBits``
quantizer, ``fp16`` stores weights in half precision and casts them to float32 in the graph (computation stays in
float32, which every onnxruntime backend runs).

onnx, onnxruntime and onnxscript are optional dependencies: only this module needs them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioConfig
from ..engine import Slot
from ..errors import VoxtralError, first_line

QUANTS = ("fp32", "fp16", "q4", "q8")
#: Largest external-data file, 512 MB (decimal: the Rust project's browser shards are "512 MB"; browsers cache
#: them whole).  The LM head's blocks are cut to fit it.
SHARD_BYTES = 512_000_000
#: Initializers smaller than this stay inside the .onnx file (norm gains, biases, small tables).
INLINE_BYTES = 4096
#: Block length of the MatMulNBits quantization (values per scale).
QUANT_BLOCK = 32
MANIFEST_FORMAT = 1
ONNX_OPSET = 18
AUDIO_GRAPH, DECODER_GRAPH = "audio_step.onnx", "decoder_step.onnx"
ONNXRUNTIME_WEB_VERSION = "1.30.0"


def _require_onnx() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise VoxtralError("exporting for the web needs onnx, onnxruntime and onnxscript: "
                           "pip install onnx onnxruntime onnxscript") from None
    return onnx, onnxruntime


# -- export-friendly step modules ---------------------------------------------------------------------------------


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # spelled out: F.rms_norm has no ONNX lowering below opset 23, which browsers' onnxruntime builds lag behind
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps))


def _ring_mask(position: torch.Tensor, count: int, columns: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries at ``position + [0, count)`` of a ring with ``columns`` columns written in order from position 0
    -> (their columns [count], mask [count, columns])."""
    queries = position + torch.arange(count, dtype=torch.long)
    last = position + (count - 1)
    column = torch.arange(columns, dtype=torch.long)
    held = last - torch.remainder(last - column, columns)  # the newest position in each column after the write
    q = queries[:, None]
    mask = (held[None] >= 0) & (held[None] <= q) & (held[None] > q - window)
    return torch.remainder(queries, columns), mask


def _attend(attention: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor,
            values: torch.Tensor, write: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One :class:`.layers.Attention` over a ring: x [1, T, dim] -> (output, new keys, new values)."""
    from ..layers import apply_rotary, grouped_attention

    length = x.shape[1]
    qk, v = attention.wqkv(x).split([attention.q_size + attention.kv_size, attention.kv_size], dim=-1)
    qk = apply_rotary(qk.view(1, length, attention.n_heads + attention.n_kv_heads, attention.head_dim), cos, sin)
    q, k = qk.transpose(1, 2).split([attention.n_heads, attention.n_kv_heads], dim=1)
    v = v.view(1, length, attention.n_kv_heads, attention.head_dim).transpose(1, 2)
    index = write[None, None, :, None].expand(1, attention.n_kv_heads, length, attention.head_dim)
    keys, values = keys.scatter(2, index, k), values.scatter(2, index, v)
    out = grouped_attention(q, keys, values, mask[None, None])
    return attention.wo(out.transpose(1, 2).reshape(1, length, attention.q_size)), keys, values


class AudioStepGraph(nn.Module):
    """One 80 ms step of audio: samples [window] -> audio embedding [1, decoder dim], with the state explicit.

    Inputs: ``samples`` (the step's mel frames' windows, starting at its first frame's left edge), ``mel_tail``
    [1, n_mels, 2], ``conv1_tail`` [1, dim, 1], ``position`` [1] (encoder frames done), then ``key_i``/``value_i``
    [1, heads, columns, head_dim] per layer; outputs the embedding and the new state in the same order.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        audio = network.config.audio
        self.encoder, self.adapter = network.encoder, network.adapter
        self.frames = audio.downsample_factor  # encoder frames per step
        self.window = self.encoder.cfg.sliding_window
        self.columns = self.window + self.frames - 1
        mel = network.mel
        self.register_buffer("windowed_dft", mel.windowed_dft.float().clone(), persistent=False)
        self.register_buffer("mel_filters", mel.mel_filters.float().clone(), persistent=False)
        starts = torch.arange(audio.mel_frames_per_token)[:, None] * audio.hop_length
        self.register_buffer("frame_index", starts + torch.arange(audio.window_size), persistent=False)
        self.log_floor = audio.global_log_mel_max - 8.0
        self.samples = (audio.mel_frames_per_token - 1) * audio.hop_length + audio.window_size

    def state_shapes(self) -> list[tuple[str, list[int]]]:
        cfg = self.encoder.cfg
        shapes = [("mel_tail", [1, cfg.num_mel_bins, 2]), ("conv1_tail", [1, cfg.dim, 1])]
        for i in range(cfg.n_layers):
            shapes += [(f"key_{i}", [1, cfg.n_heads, self.columns, cfg.head_dim]),
                       (f"value_{i}", [1, cfg.n_heads, self.columns, cfg.head_dim])]
        return shapes

    def forward(self, samples: torch.Tensor, mel_tail: torch.Tensor, conv1_tail: torch.Tensor,
                position: torch.Tensor, *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # log-mel exactly as LogMelSpectrogram.frames, with the framing as a gather
        spectrum = samples[self.frame_index] @ self.windowed_dft
        n_freq = spectrum.shape[-1] // 2
        power = spectrum[:, :n_freq] ** 2 + spectrum[:, n_freq:] ** 2
        log_mel = torch.clamp(power @ self.mel_filters, min=1e-10).log10()
        mel = ((torch.clamp(log_mel, min=self.log_floor) + 4.0) / 4.0).transpose(0, 1)[None]
        stem = self.encoder.conv_stem
        x = torch.cat([mel_tail, mel], dim=-1)
        c1 = torch.cat([conv1_tail, F.gelu(stem.conv1(x))], dim=-1)
        h = F.gelu(stem.conv2(c1)).transpose(1, 2)  # [1, frames, dim]
        write, mask = _ring_mask(position, self.frames, self.columns, self.window)
        positions = (position + torch.arange(self.frames, dtype=torch.long))[None]
        cos, sin = self.encoder.rotary.cos_sin(positions, h.dtype)
        new_cache = []
        for i, layer in enumerate(self.encoder.layers):
            out, k, v = _attend(layer.attention, _rms_norm(layer.attention_norm, h), cos, sin, cache[2 * i],
                                cache[2 * i + 1], write, mask)
            h = h + out
            h = h + layer.feed_forward(_rms_norm(layer.ffn_norm, h))
            new_cache += [k, v]
        embedding = self.adapter(_rms_norm(self.encoder.norm, h))[:, 0]
        return (embedding, x[..., -2:], c1[..., -1:], *new_cache)


class DecoderStepGraph(nn.Module):
    """One decoder position: token [1] + audio embedding [1, dim] at ``position`` [1] with ``delay`` [1] (steps,
    float) -> the greedy next token [1], with ``key_i``/``value_i`` [1, kv heads, columns, head_dim] per layer
    in and out.

    The LM head (the tied embedding) is cut into blocks of rows of at most ``block_bytes`` in float32 so that no
    single weight exceeds a shard.  ``separate_embedding``: the lookup reads a table of its own (for quantized
    exports, where :func:`_embed_from_quantized_head` then points it at the quantized head); otherwise it reads
    the head's float weight directly.
    """

    def __init__(self, network: nn.Module, *, context: int | None = None, block_bytes: int = SHARD_BYTES,
                 separate_embedding: bool = False) -> None:
        super().__init__()
        decoder = network.decoder
        cfg = decoder.cfg
        self.decoder = decoder
        self.window = min(cfg.sliding_window, context or cfg.sliding_window)
        self.columns = self.window  # one position per call
        weight = decoder.tok_embeddings.weight.detach().float()
        rows = max(1, block_bytes // (4 * cfg.dim))
        self.block_starts = list(range(0, cfg.vocab_size, rows))
        # [dim, rows] blocks: logits are plain MatMuls, which onnxruntime's weight quantizers recognise
        self.head = nn.ParameterList(nn.Parameter(weight[s:s + rows].t().contiguous(), requires_grad=False)
                                     for s in self.block_starts)
        self.embedding = (nn.ParameterList(nn.Parameter(weight[s:s + rows].clone(), requires_grad=False)
                                           for s in self.block_starts) if separate_embedding else None)
        inv_freq = torch.exp(-math.log(10_000.0) * torch.arange(cfg.dim // 2).float() / (cfg.dim // 2))
        self.register_buffer("time_inv_freq", inv_freq, persistent=False)

    def state_shapes(self) -> list[tuple[str, list[int]]]:
        cfg = self.decoder.cfg
        shapes = []
        for i in range(cfg.n_layers):
            shapes += [(f"key_{i}", [1, cfg.n_kv_heads, self.columns, cfg.head_dim]),
                       (f"value_{i}", [1, cfg.n_kv_heads, self.columns, cfg.head_dim])]
        return shapes

    def _embed(self, token: torch.Tensor) -> torch.Tensor:
        out = None
        for b, start in enumerate(self.block_starts):
            table = self.embedding[b] if self.embedding is not None else self.head[b]
            rows = table.shape[0] if self.embedding is not None else table.shape[1]
            index = torch.clamp(token - start, 0, rows - 1)
            row = table[index] if self.embedding is not None else table[:, index].t()
            if len(self.block_starts) > 1:
                inside = (token >= start) & (token < start + rows)
                row = torch.where(inside[:, None], row, torch.zeros_like(row))
            out = row if out is None else out + row
        return out

    def forward(self, token: torch.Tensor, audio: torch.Tensor, position: torch.Tensor, delay: torch.Tensor,
                *cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        decoder = self.decoder
        h = (self._embed(token) + audio)[:, None]  # [1, 1, dim]
        angles = delay * self.time_inv_freq  # the delay's sinusoidal embedding (decoder.time_embedding)
        t_cond = torch.cat([angles.cos(), angles.sin()])
        write, mask = _ring_mask(position, 1, self.columns, self.window)
        cos, sin = decoder.rotary.cos_sin(position[None], h.dtype)
        new_cache = []
        for i, layer in enumerate(decoder.layers):
            out, k, v = _attend(layer.attention, _rms_norm(layer.attention_norm, h), cos, sin, cache[2 * i],
                                cache[2 * i + 1], write, mask)
            h = h + out
            scale = 1 + layer.ada_norm(t_cond)
            h = h + layer.feed_forward(_rms_norm(layer.ffn_norm, h) * scale)
            new_cache += [k, v]
        last = _rms_norm(decoder.norm, h[:, -1])
        logits = torch.cat([last @ block for block in self.head], dim=-1)
        return (logits.argmax(dim=-1), *new_cache)


# -- export --------------------------------------------------------------------------------------------------------


@dataclass
class GraphSpec:
    file: str
    inputs: list[dict[str, Any]]  # name, shape, dtype
    outputs: list[str]
    state: list[dict[str, Any]] = field(default_factory=list)  # input, output, shape, dtype, fill


def _export_graph(module: nn.Module, example: tuple[torch.Tensor, ...], input_names: list[str],
                  output_names: list[str], path: Path) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, example, str(path), input_names=input_names, output_names=output_names,
                          opset_version=ONNX_OPSET, dynamo=False, do_constant_folding=True,
                          external_data=True)


def _audio_spec(graph: AudioStepGraph) -> tuple[GraphSpec, tuple[torch.Tensor, ...]]:
    state = graph.state_shapes()
    inputs = [{"name": "samples", "shape": [graph.samples], "dtype": "float32"},
              {"name": "position", "shape": [1], "dtype": "int64"}]
    spec = GraphSpec(AUDIO_GRAPH, inputs, ["embedding"],
                     [{"input": n, "output": f"{n}_out", "shape": s, "dtype": "float32", "fill": 0.0}
                      for n, s in state])
    example = (torch.zeros(graph.samples), torch.zeros(state[0][1]), torch.zeros(state[1][1]),
               torch.tensor([8], dtype=torch.long), *(torch.zeros(s) for _, s in state[2:]))
    return spec, example


def _decoder_spec(graph: DecoderStepGraph) -> tuple[GraphSpec, tuple[torch.Tensor, ...]]:
    dim = graph.decoder.cfg.dim
    state = graph.state_shapes()
    inputs = [{"name": "token", "shape": [1], "dtype": "int64"},
              {"name": "audio", "shape": [1, dim], "dtype": "float32"},
              {"name": "position", "shape": [1], "dtype": "int64"},
              {"name": "delay", "shape": [1], "dtype": "float32"}]
    spec = GraphSpec(DECODER_GRAPH, inputs, ["next_token"],
                     [{"input": n, "output": f"{n}_out", "shape": s, "dtype": "float32", "fill": 0.0}
                      for n, s in state])
    example = (torch.tensor([1], dtype=torch.long), torch.zeros(1, dim), torch.tensor([3], dtype=torch.long),
               torch.tensor([6.0]), *(torch.zeros(s) for _, s in state))
    return spec, example


def _export_order(spec: GraphSpec) -> tuple[list[str], list[str]]:
    """Input and output names in the modules' argument order (fixed inputs, then state)."""
    fixed = [i["name"] for i in spec.inputs]
    if spec.file == AUDIO_GRAPH:  # forward(samples, mel_tail, conv1_tail, position, *cache)
        state = [s["input"] for s in spec.state]
        names = [fixed[0], state[0], state[1], fixed[1], *state[2:]]
    else:
        names = fixed + [s["input"] for s in spec.state]
    return names, spec.outputs + [s["output"] for s in spec.state]


def _to_fp16_storage(onnx: Any, model: Any, prefix: str = "") -> None:
    """Store large float32 initializers (those whose names start with ``prefix``) as float16, each followed by a
    Cast back to float32 (computation stays float32: the CPU and WebAssembly backends have few float16
    kernels)."""
    from onnx import numpy_helper

    casts = []
    for init in model.graph.initializer:
        if (init.data_type != onnx.TensorProto.FLOAT or _tensor_bytes(init) < INLINE_BYTES
                or not init.name.startswith(prefix)):
            continue
        array = numpy_helper.to_array(init).astype(np.float16)
        name = init.name
        init.CopyFrom(numpy_helper.from_array(array, name + "_fp16"))
        casts.append(onnx.helper.make_node("Cast", [name + "_fp16"], [name], to=onnx.TensorProto.FLOAT,
                                           name=f"cast_{name}"))
    for node in reversed(casts):
        model.graph.node.insert(0, node)


def _embed_from_quantized_head(onnx: Any, model: Any) -> None:
    """Make the token lookup read the quantized LM head (the tied weight) instead of a table of its own.

    The quantizer turns each head block's MatMul into MatMulNBits with ``head.{b}_Q{bits}`` [N, blocks, bytes]
    (values packed low bits first) and ``head.{b}_scales`` [N, blocks], symmetric, so the implicit zero point is
    ``2 ** (bits - 1)``; row ``t`` of that weight is token ``t``'s embedding.  Each ``Gather(embedding.{b}, i)``
    becomes a gather of the packed row and its scales and a dequantization in standard ops, and the float table
    is dropped: the download carries the embedding once, quantized.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    nodes, new_nodes, dropped = list(model.graph.node), [], set()
    for node in nodes:
        table = node.input[0] if node.op_type == "Gather" and node.input else ""
        if not table.startswith("embedding."):
            new_nodes.append(node)
            continue
        block = table.removeprefix("embedding.")
        head = next((n for n in nodes if n.op_type == "MatMulNBits" and n.input[1].startswith(f"head.{block}_Q")),
                    None)
        if head is None:
            raise VoxtralError(f"internal error: no quantized head block {block} for the token lookup")
        attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
        bits, size, k = attrs["bits"], attrs["block_size"], attrs["K"]
        packed, scales = head.input[1], head.input[2]
        blocks = inits[packed].dims[1]
        p = f"embed{block}_"
        c = {  # small constants of the dequantization
            "levels": numpy_helper.from_array(np.array(1 << bits, np.int32), p + "levels"),
            "zero": numpy_helper.from_array(np.array(1 << (bits - 1), np.int32), p + "zero"),
            "shape": numpy_helper.from_array(np.array([-1, blocks, size], np.int64), p + "shape"),
            "flat": numpy_helper.from_array(np.array([-1, blocks * size], np.int64), p + "flat"),
            "last": numpy_helper.from_array(np.array([-1], np.int64), p + "last"),
            "start": numpy_helper.from_array(np.array([0], np.int64), p + "start"),
            "end": numpy_helper.from_array(np.array([k], np.int64), p + "end"),
        }
        index = node.input[1]
        steps = [helper.make_node("Gather", [packed, index], [p + "bytes"], axis=0),
                 helper.make_node("Cast", [p + "bytes"], [p + "ints"], to=onnx.TensorProto.INT32)]
        digits = [p + "ints"]
        if bits < 8:  # unpack: value j of a byte is (byte // levels**j) % levels, lowest first
            digits = []
            current = p + "ints"
            for j in range(8 // bits):
                steps.append(helper.make_node("Mod", [current, c["levels"].name], [f"{p}d{j}"]))
                steps.append(helper.make_node("Unsqueeze", [f"{p}d{j}", c["last"].name], [f"{p}u{j}"]))
                digits.append(f"{p}u{j}")
                if j + 1 < 8 // bits:
                    steps.append(helper.make_node("Div", [current, c["levels"].name], [f"{p}r{j}"]))
                    current = f"{p}r{j}"
            steps.append(helper.make_node("Concat", digits, [p + "digits"], axis=-1))
            digits = [p + "digits"]
        steps += [
            helper.make_node("Reshape", [digits[0], c["shape"].name], [p + "q"]),
            helper.make_node("Sub", [p + "q", c["zero"].name], [p + "centred"]),
            helper.make_node("Cast", [p + "centred"], [p + "values"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Gather", [scales, index], [p + "row_scales"], axis=0),
            helper.make_node("Unsqueeze", [p + "row_scales", c["last"].name], [p + "scale"]),
            helper.make_node("Mul", [p + "values", p + "scale"], [p + "scaled"]),
            helper.make_node("Reshape", [p + "scaled", c["flat"].name], [p + "padded"]),
            helper.make_node("Slice", [p + "padded", c["start"].name, c["end"].name, c["last"].name], list(node.output)),
        ]
        new_nodes += steps
        used = {name for step in steps for name in step.input}
        model.graph.initializer.extend(t for t in c.values() if t.name in used)
        dropped.add(table)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    kept = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)


def _tensor_bytes(init: Any) -> int:
    from onnx import helper

    count = int(np.prod(init.dims)) if len(init.dims) else 1
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize


def _quantize(model: Any, bits: int) -> Any:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # the quantizer logs every node at INFO level: a line per weight on the user's terminal
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=QUANT_BLOCK, is_symmetric=True,
                                     op_types_to_quantize=("MatMul",))
    quantizer.process()
    return quantizer.model.model


def _save_sharded(onnx: Any, model: Any, out: Path, stem: str, shard_bytes: int) -> list[str]:
    """Write ``model`` to ``out/stem.onnx`` with its large initializers in ``stem.weights.N`` files of at most
    ``shard_bytes`` each (an initializer never spans two files); return the shard file names."""
    from onnx.external_data_helper import set_external_data

    # first plan which file and offset each large initializer goes to, then write each file in one go
    shards: list[list[Any]] = []
    used = 0
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise VoxtralError(f"internal error: {init.name} still refers to external data")
        size = len(init.raw_data)
        if size < INLINE_BYTES:
            continue
        if size > shard_bytes:
            raise VoxtralError(f"weight {init.name} is {size} bytes, more than one shard ({shard_bytes})")
        used += (-used) % 64  # 64-byte alignment lets onnxruntime map tensors in place
        if not shards or used + size > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append((init, used))
        used += size
    names = [f"{stem}.weights.{i}" for i in range(len(shards))]
    for name, members in zip(names, shards):
        with open(out / name, "wb") as handle:
            for init, offset in members:
                handle.write(b"\0" * (offset - handle.tell()))
                handle.write(init.raw_data)
                set_external_data(init, name, offset=offset, length=len(init.raw_data))
                init.data_location = onnx.TensorProto.EXTERNAL
                init.ClearField("raw_data")
    (out / f"{stem}.onnx").write_bytes(model.SerializeToString())
    return names


def _load_with_raw_data(onnx: Any, path: Path) -> Any:
    """Load an exported graph with every initializer as raw bytes (the exporter writes some as typed fields)."""
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    for init in model.graph.initializer:
        if not init.HasField("raw_data"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))
    return model


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def export_web(model: Any, out: str | os.PathLike[str], *, quant: str = "q4", decoder_context: int | None = None,
               shard_bytes: int = SHARD_BYTES, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """Write the browser bundle of ``model`` (a loaded :class:`.api.Model`, float32 on the CPU) to ``out``:
    the two step graphs with their weight shards, ``tekken.json`` and ``manifest.json``; return the manifest.

    ``decoder_context`` caps the decoder's attention window (and its KV ring, the page's largest buffer) below
    the model's 8192 tokens; streams shorter than the cap are exact.  ``progress(done, total, what)``.
    """
    onnx, _ = _require_onnx()
    if quant not in QUANTS:
        raise VoxtralError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}")
    if model.dtype != torch.float32 or model.device.type != "cpu":
        raise VoxtralError("export needs the model loaded in float32 on the CPU (load(..., device='cpu', "
                           "dtype='f32'))")
    network = model.network
    # the step graphs read plain float weights; a quantized model (.gguf) replaces these modules
    linears = [m for layer in [*network.encoder.layers, *network.decoder.layers]
               for m in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w13, layer.feed_forward.w2)]
    if type(network.decoder.tok_embeddings) is not nn.Embedding or any(type(m) is not nn.Linear for m in linears):
        raise VoxtralError("export needs a floating-point checkpoint (safetensors), not an already quantized one "
                           "(.gguf); pick the precision with --quant")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    steps = 7
    done = 0

    def report(what: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(done, steps, what)

    audio_graph = AudioStepGraph(network).eval()
    decoder_graph = DecoderStepGraph(network, context=decoder_context, block_bytes=shard_bytes,
                                     separate_embedding=quant in ("q4", "q8")).eval()
    graphs = []
    with tempfile.TemporaryDirectory(prefix="voxtral-onnx-") as scratch, torch.no_grad():
        for module, (spec, example) in ((audio_graph, _audio_spec(audio_graph)),
                                        (decoder_graph, _decoder_spec(decoder_graph))):
            stem = spec.file.removesuffix(".onnx")
            raw = Path(scratch) / spec.file
            inputs, outputs = _export_order(spec)
            _export_graph(module, example, inputs, outputs, raw)
            report(f"exported {spec.file}")
            proto = _load_with_raw_data(onnx, raw)
            if quant == "fp16":
                _to_fp16_storage(onnx, proto)
            elif quant in ("q4", "q8"):
                proto = _quantize(proto, 4 if quant == "q4" else 8)
                _load_raw(proto)
                _embed_from_quantized_head(onnx, proto)
            report(f"quantized {spec.file} ({quant})")
            for old in out.glob(f"{stem}.weights.*"):  # a previous export's shards would be served stale
                old.unlink()
            shards = _save_sharded(onnx, proto, out, stem, shard_bytes)
            graphs.append((spec, shards))
            report(f"wrote {spec.file}")
    shutil.copyfile(model.tokenizer.path, out / "tekken.json")
    _write_vocab(model, out / "vocab.json")
    manifest = _manifest(model, out, graphs, quant, decoder_graph.window)
    report("hashed files")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _write_vocab(model: Any, path: Path) -> None:
    """The bytes of every text token the model can emit, base64, in id order from ``num_special_tokens``: all the
    page needs to turn ids into text (tekken.json is larger and would need a BPE implementation)."""
    import base64

    tok = model.tokenizer
    pieces = [base64.b64encode(tok.token_bytes(i)).decode("ascii")
              for i in range(tok.num_special_tokens, model.config.decoder.vocab_size)]
    path.write_text(json.dumps({"first_id": tok.num_special_tokens, "pieces": pieces}, separators=(",", ":")),
                    encoding="utf-8")


def _load_raw(model: Any) -> None:
    from onnx import numpy_helper

    for init in model.graph.initializer:
        if not init.HasField("raw_data"):
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init), init.name))


def _manifest(model: Any, out: Path, graphs: list[tuple[GraphSpec, list[str]]], quant: str,
              decoder_window: int) -> dict:
    cfg, tok = model.config, model.tokenizer
    audio = cfg.audio
    files = []
    for spec, shards in graphs:
        files += [spec.file, *shards]
    files += ["tekken.json", "vocab.json"]
    return {
        "format": MANIFEST_FORMAT,
        "model": Path(model.source).name,
        "quant": quant,
        "audio": {
            "sample_rate": audio.sample_rate, "hop_length": audio.hop_length, "window_size": audio.window_size,
            "frame_rate": audio.frame_rate, "num_mel_bins": audio.num_mel_bins,
            "global_log_mel_max": audio.global_log_mel_max, "downsample_factor": audio.downsample_factor,
            "transcription_delay_ms": audio.transcription_delay_ms, "n_left_pad_tokens": audio.n_left_pad_tokens,
            "samples_per_step": audio.samples_per_token,
            "step_window": (audio.mel_frames_per_token - 1) * audio.hop_length + audio.window_size,
        },
        "delay": {"default_ms": audio.transcription_delay_ms,
                  "right_pad_extra_tokens": audio.n_right_pad_tokens(0),  # right padding = delay + this
                  "default_tokens": audio.delay_tokens(None), "token_ms": audio.token_ms},
        "encoder": {"window": cfg.encoder.sliding_window, "frames_per_step": audio.downsample_factor},
        "decoder": {"window": decoder_window, "model_window": cfg.decoder.sliding_window,
                    "dim": cfg.decoder.dim, "vocab_size": cfg.decoder.vocab_size},
        "special": {"bos": tok.bos_id, "eos": tok.eos_id, "streaming_pad": tok.streaming_pad_id,
                    "streaming_word": tok.streaming_word_id, "num_special_tokens": tok.num_special_tokens},
        "graphs": {"audio": _graph_entry(graphs[0]), "decoder": _graph_entry(graphs[1])},
        "files": [{"name": f, "bytes": (out / f).stat().st_size, "sha256": _sha256(out / f)} for f in files],
    }


def _graph_entry(graph: tuple[GraphSpec, list[str]]) -> dict:
    spec, shards = graph
    return {"file": spec.file, "weights": shards, "inputs": spec.inputs, "outputs": spec.outputs,
            "state": spec.state}


# -- size arithmetic ---------------------------------------------------------------------------------------------


def estimate_export_bytes(config: Any, quant: str, *, decoder_context: int | None = None) -> dict[str, int]:
    """What :func:`export_web` writes for ``config`` (bytes of graphs + weights, without the tokenizer files) and
    the page's state buffers, computed from the shapes alone: for checkpoints too large to export on this machine.

    Rules, as the exporter applies them: every linear is a MatMul, stored as float32, float16, or MatMulNBits
    (per block of 32 values: 32 * bits / 8 bytes + one float32 scale, symmetric so no zero points); other
    weights (norms, biases, convolutions) stay float32 (float16 in an fp16 export when at least 4 KB); the token
    lookup reads the LM head's weight (tied), so the table is stored once; the front end's DFT and mel matrices
    are constants of the audio graph.
    """
    if quant not in QUANTS:
        raise VoxtralError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}")
    from ..model import VoxtralRealtime

    with torch.device("meta"):
        network = VoxtralRealtime(config)
    bits = {"q4": 4, "q8": 8}.get(quant)

    def matmul(k: int, n: int) -> int:
        if bits:
            return n * -(-k // QUANT_BLOCK) * (QUANT_BLOCK * bits // 8 + 4)
        return k * n * (2 if quant == "fp16" else 4)

    def other(count: int) -> int:
        return 2 * count if quant == "fp16" and 4 * count >= INLINE_BYTES else 4 * count

    def stack(modules: list[nn.Module]) -> int:
        total = 0
        for module in modules:
            for sub in module.modules():
                for name, param in sub.named_parameters(recurse=False):
                    if isinstance(sub, nn.Linear) and name == "weight":
                        total += matmul(sub.in_features, sub.out_features)
                    elif not isinstance(sub, nn.Embedding):
                        total += other(param.numel())
        return total

    audio, dec = config.audio, config.decoder
    n_freq = 1 + audio.window_size // 2
    constants = 4 * (audio.window_size * 2 * n_freq + n_freq * audio.num_mel_bins) + 8 * (
        audio.mel_frames_per_token * audio.window_size)
    audio_bytes = stack([network.encoder, network.adapter]) + constants
    decoder_bytes = stack([network.decoder]) + matmul(dec.dim, dec.vocab_size)
    enc = config.encoder
    window = min(dec.sliding_window, decoder_context or dec.sliding_window)
    state = 4 * (2 * enc.n_layers * enc.n_heads * (enc.sliding_window + audio.downsample_factor - 1) * enc.head_dim
                 + 2 * dec.n_layers * dec.n_kv_heads * window * dec.head_dim)
    return {"audio_graph": audio_bytes, "decoder_graph": decoder_bytes, "download": audio_bytes + decoder_bytes,
            "state": state}


# -- running an export (the parity check; the page does the same in JavaScript) -------------------------------


def read_manifest(folder: str | os.PathLike[str], *, verify: bool = True) -> dict:
    """The manifest of an export folder, with every listed file checked (present, size, and with ``verify`` its
    sha256); a one-line :class:`VoxtralError` otherwise."""
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise VoxtralError(f"{folder}: no manifest.json (not a `voxtral export web` folder)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        for key in ("audio", "decoder"):
            graph = manifest["graphs"][key]
            if not isinstance(graph["file"], str) or not isinstance(graph["state"], list):
                raise TypeError(f"graphs.{key} lacks its file or state")
    except (ValueError, KeyError, TypeError) as exc:
        raise VoxtralError(f"{path}: not a valid manifest ({first_line(exc)})") from None
    for entry in files:
        f = folder / entry["name"]
        if not f.is_file():
            raise VoxtralError(f"{f}: missing (listed in manifest.json)")
        if f.stat().st_size != entry["bytes"]:
            raise VoxtralError(f"{f}: {f.stat().st_size} bytes, manifest.json says {entry['bytes']}")
        if verify and _sha256(f) != entry["sha256"]:
            raise VoxtralError(f"{f}: sha256 mismatch (corrupted or from another export)")
    return manifest


class WebExport:
    """An export folder loaded into onnxruntime (CPU): the model-like object :class:`.streaming.StreamingSession`
    needs (``config.audio``, ``tokenizer``), and :meth:`transcribe`, which runs the two step graphs exactly as
    the page does."""

    def __init__(self, folder: str | os.PathLike[str], *, verify: bool = True, threads: int | None = None) -> None:
        _, ort = _require_onnx()
        from ..tokenizer import Tokenizer

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
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
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
        from ..audio import load_audio
        from ..streaming import StreamingSession

        samples = load_audio(audio, sample_rate=sample_rate)
        session = StreamingSession(self, delay_ms=delay_ms, track_latency=False)
        session.feed(samples)
        session.finish()
        return session.transcription


def step_agreement(export: WebExport, audio: Any, reference_tokens: Sequence[int], *,
                   delay_ms: int | None = None) -> float:
    """The fraction of ``reference_tokens`` (a transcription of ``audio``) that the export chooses when every
    step is fed the reference's previous token: a per-step measure of how far quantization moves the argmax."""
    from ..audio import load_audio

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
    engine.reset(slot, [tok.bos_id] + [tok.streaming_pad_id] * (cfg.n_left_pad_tokens + delay), delay)
    right = (-len(samples)) % cfg.samples_per_token + cfg.n_right_pad_tokens(delay) * cfg.samples_per_token
    engine.push(slot, np.concatenate([samples, np.zeros(right, np.float32)]))
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
        audio = self.export.config.audio
        self.audio_state.reset()
        self.decoder_state.reset()
        slot.prompt, slot.delay_tokens = list(prompt), delay_tokens
        slot.samples = np.zeros(audio.window_size // 2, np.float32)  # the first frame is centred on sample 0
        slot.samples_pushed = slot.encoder_position = slot.position = 0
        slot.embeddings.clear()
        slot.embedding_limit, slot.stopped = None, False
        self.push(slot, np.zeros(audio.n_left_pad_tokens * self.step_samples, np.float32))

    def push(self, slot: _OnnxSlot, samples: np.ndarray) -> None:
        slot.samples = np.concatenate([slot.samples, samples.astype(np.float32, copy=False)])
        slot.samples_pushed += len(samples)

    def end(self, slot: _OnnxSlot) -> None:
        slot.embedding_limit = slot.samples_pushed // self.step_samples - 1
        half = self.export.config.audio.window_size // 2
        slot.samples = np.concatenate([slot.samples, np.zeros(half, np.float32)])

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


# -- serving the page from `voxtral serve` ------------------------------------------------------------------------


def mount_local(app: Any, folder: str | os.PathLike[str], path: str = "/local") -> None:
    """Serve an export folder with its page (``--onnxruntime-web``) at ``path`` of a Starlette/FastAPI ``app``,
    ahead of any catch-all mount.  The responses are cross-origin isolated (COOP/COEP), which lets
    onnxruntime-web use WebAssembly threads; the page fetches only same-origin files, so nothing breaks."""
    from starlette.responses import RedirectResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    folder = Path(folder)
    read_manifest(folder, verify=False)
    if not (folder / "index.html").is_file() or not (folder / "ort").is_dir():
        raise VoxtralError(f"{folder}: no page in it; export with --onnxruntime-web to add it")
    static = StaticFiles(directory=folder, html=True)
    isolation = [(b"cross-origin-opener-policy", b"same-origin"), (b"cross-origin-embedder-policy", b"require-corp")]

    async def isolated(scope: Any, receive: Any, send: Any) -> None:
        async def send_isolated(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *isolation]}
            await send(message)

        await static(scope, receive, send_isolated)

    async def add_slash(request: Any) -> Any:
        return RedirectResponse(path + "/")

    # routes match in order: in front of the server's own page, which is mounted at "/"
    app.router.routes[0:0] = [Route(path, add_slash), Mount(path, app=isolated, name="local")]


# -- the page's runtime files ------------------------------------------------------------------------------------


def copy_page(out: Path, onnxruntime_web: str | os.PathLike[str] | None) -> list[str]:
    """Copy the page (HTML + JS modules shipped in this package) into ``out`` and, from ``onnxruntime_web``
    (an ``npm pack`` tarball, a ``node_modules/onnxruntime-web`` folder, or "npm": the pinned version fetched with
    npm pack), the onnxruntime-web files it loads; return the copied names."""
    here = Path(__file__).parent
    # the transcript-file writers and the microphone capture (with its resampler) are the server page's modules:
    # one implementation of each
    files = [f for f in sorted((here / "page").iterdir()) if f.is_file()]
    files += [here.parent / "server" / "web" / name for name in ("subtitles.js", "pcm-capture.worklet.js", "resampler.js")]
    copied = []
    for f in files:
        shutil.copyfile(f, out / f.name)
        copied.append(f.name)
    if onnxruntime_web == "npm":
        onnxruntime_web = npm_pack_onnxruntime_web()
    if onnxruntime_web is not None:
        copied += _copy_onnxruntime_web(Path(onnxruntime_web), out / "ort")
    return copied


#: The onnxruntime-web files the page imports: the ES module bundle with WebGPU, and its WebAssembly binaries.
ORT_WEB_FILES = ("ort.webgpu.bundle.min.mjs", "ort-wasm-simd-threaded.jsep.mjs", "ort-wasm-simd-threaded.jsep.wasm",
                 "ort-wasm-simd-threaded.asyncify.mjs", "ort-wasm-simd-threaded.asyncify.wasm")


def npm_pack_onnxruntime_web(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The pinned onnxruntime-web npm tarball, fetched once with ``npm pack`` into ``cache_dir`` (default:
    ~/.cache/voxtral-realtime)."""
    import subprocess

    folder = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "voxtral-realtime"
    tarball = folder / f"onnxruntime-web-{ONNXRUNTIME_WEB_VERSION}.tgz"
    if tarball.is_file():
        return tarball
    if shutil.which("npm") is None:
        raise VoxtralError("fetching onnxruntime-web needs npm (Debian/Ubuntu: apt install npm), or pass a tarball "
                           "made elsewhere with `npm pack onnxruntime-web@" + ONNXRUNTIME_WEB_VERSION + "`")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["npm", "pack", f"onnxruntime-web@{ONNXRUNTIME_WEB_VERSION}", "--pack-destination",
                        str(folder)], check=True, capture_output=True, text=True, timeout=180)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        raise VoxtralError(f"npm pack onnxruntime-web@{ONNXRUNTIME_WEB_VERSION} failed "
                           f"({first_line(detail.strip() or str(exc))})") from None
    if not tarball.is_file():
        raise VoxtralError(f"npm pack did not write {tarball}")
    return tarball


def _copy_onnxruntime_web(source: Path, dest: Path) -> list[str]:
    import tarfile

    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    if source.is_file():
        try:
            with tarfile.open(source) as tar:
                members = {m.name.removeprefix("package/dist/"): m for m in tar.getmembers()
                           if m.name.startswith("package/dist/")}
                version = json.load(tar.extractfile("package/package.json"))["version"]
                for name in ORT_WEB_FILES:
                    if name in members:
                        (dest / name).write_bytes(tar.extractfile(members[name]).read())
                        copied.append(f"ort/{name}")
        except (tarfile.TarError, KeyError, OSError, ValueError) as exc:
            raise VoxtralError(f"{source}: not an onnxruntime-web npm tarball ({first_line(exc)})") from None
    elif (source / "dist").is_dir():
        version = json.loads((source / "package.json").read_text())["version"]
        for name in ORT_WEB_FILES:
            if (source / "dist" / name).is_file():
                shutil.copyfile(source / "dist" / name, dest / name)
                copied.append(f"ort/{name}")
    else:
        raise VoxtralError(f"{source}: give an onnxruntime-web npm tarball (npm pack onnxruntime-web@"
                           f"{ONNXRUNTIME_WEB_VERSION}) or its node_modules/onnxruntime-web folder")
    if "ort/ort.webgpu.bundle.min.mjs" not in copied:
        raise VoxtralError(f"{source}: no dist/ort.webgpu.bundle.min.mjs in it (onnxruntime-web too old?)")
    (dest / "VERSION").write_text(version + "\n")
    return copied
