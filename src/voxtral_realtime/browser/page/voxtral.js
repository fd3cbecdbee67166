// Voxtral Realtime in the page: downloads an export of `voxtral export web` (manifest.json, two ONNX step graphs,
// weight shards, vocab.json) and runs it with onnxruntime-web, one 80 ms step at a time.
//
// The streaming protocol is the Python package's (streaming.py / web_export.OnnxEngine), for one stream:
// the decoder sees BOS + STREAMING_PAD x (left pad + delay) while the audio opens with left-pad steps of silence;
// each audio step of `step_window` samples (advancing 1280) gives one audio embedding; each embedding allows one
// decoder position, whose greedy token is fed back; at the end, silence (delay + 11 steps) flushes the last words.

import * as ort from "./ort/ort.webgpu.bundle.min.mjs";

const CACHE_NAME = "voxtral-web-v1";

export class LoadError extends Error {}

/** Download `name` from `base` with progress, checking its size and sha256 against the manifest; keep it in the
 * Cache API so that a second visit reads it locally. */
async function fetchChecked(base, entry, onBytes) {
  const url = new URL(entry.name, base).href;
  // the hash in the key: a new export under the same name never reads a stale cached file
  const key = `${url}?sha256=${entry.sha256}`;
  const cache = "caches" in self ? await caches.open(CACHE_NAME).catch(() => null) : null;
  let bytes = null;
  if (cache) {
    const hit = await cache.match(key);
    if (hit) {
      bytes = new Uint8Array(await hit.arrayBuffer());
      if (bytes.byteLength !== entry.bytes) bytes = null;
      else onBytes(bytes.byteLength);
    }
  }
  if (!bytes) {
    let response;
    try {
      response = await fetch(url);
    } catch (err) {
      throw new LoadError(`${entry.name}: download failed (${err.message})`);
    }
    if (!response.ok) throw new LoadError(`${entry.name}: missing from the export (HTTP ${response.status})`);
    bytes = new Uint8Array(entry.bytes);
    let received = 0;
    const reader = response.body.getReader();
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      if (received + value.byteLength > entry.bytes) {
        throw new LoadError(`${entry.name}: larger than manifest.json says (${entry.bytes} bytes)`);
      }
      bytes.set(value, received);
      received += value.byteLength;
      onBytes(value.byteLength);
    }
    if (received !== entry.bytes) {
      throw new LoadError(`${entry.name}: ${received} bytes, manifest.json says ${entry.bytes}`);
    }
  }
  const digest = await crypto.subtle.digest("SHA-256", bytes);
  const hex = Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
  if (hex !== entry.sha256) {
    if (cache) await cache.delete(key);
    throw new LoadError(`${entry.name}: sha256 mismatch (corrupted or from another export); export again`);
  }
  if (cache) {
    await cache.put(key, new Response(bytes)).catch(() => {}); // a full quota only costs the next visit time
  }
  return bytes;
}

async function pickBackend(preferred) {
  if (preferred !== "wasm" && typeof navigator !== "undefined" && navigator.gpu) {
    try {
      if (await navigator.gpu.requestAdapter()) return "webgpu";
    } catch {
      /* no usable adapter: WebAssembly */
    }
  }
  return "wasm";
}

export class VoxtralWeb {
  /** Load an export folder. onProgress(doneBytes, totalBytes, what); backend: "auto" | "webgpu" | "wasm". */
  static async load(base, { onProgress = () => {}, backend = "auto" } = {}) {
    base = new URL(base, location.href);
    if (!base.href.endsWith("/")) base = new URL(base.href + "/");
    let manifest;
    try {
      const response = await fetch(new URL("manifest.json", base));
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      manifest = await response.json();
    } catch (err) {
      throw new LoadError(`manifest.json: cannot read it (${err.message}); is this an export folder?`);
    }
    const wanted = new Set(["vocab.json"]);
    for (const graph of Object.values(manifest.graphs)) {
      wanted.add(graph.file);
      graph.weights.forEach((w) => wanted.add(w));
    }
    const entries = manifest.files.filter((f) => wanted.has(f.name));
    const total = entries.reduce((n, f) => n + f.bytes, 0);
    let done = 0;
    const files = {};
    for (const entry of entries) {
      files[entry.name] = await fetchChecked(base, entry, (n) => {
        done += n;
        onProgress(done, total, entry.name);
      });
    }
    const chosen = await pickBackend(backend);
    ort.env.wasm.wasmPaths = new URL("ort/", import.meta.url).href;
    // threads need a cross-origin isolated page (COOP/COEP headers); a plain static server gets one thread
    ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
    const sessions = {};
    let backendUsed = chosen;
    for (const [key, graph] of Object.entries(manifest.graphs)) {
      const options = (ep) => ({
        executionProviders: [ep],
        externalData: graph.weights.map((w) => ({ path: w, data: files[w] })),
        graphOptimizationLevel: "all",
        // WebGPU: the state stays on the GPU between steps instead of travelling through the CPU each time
        preferredOutputLocation: ep === "webgpu"
          ? Object.fromEntries(graph.state.map((s) => [s.output, "gpu-buffer"])) : undefined,
      });
      try {
        sessions[key] = await ort.InferenceSession.create(files[graph.file], options(backendUsed));
      } catch (err) {
        if (backendUsed !== "webgpu") throw new LoadError(`${graph.file}: onnxruntime-web cannot load it (${err.message})`);
        console.warn(`WebGPU failed (${err.message}); using WebAssembly`);
        backendUsed = "wasm";
        for (const s of Object.values(sessions)) await s.release();
        return VoxtralWeb.load(base, { onProgress, backend: "wasm" });
      }
    }
    const vocab = JSON.parse(new TextDecoder().decode(files["vocab.json"]));
    return new VoxtralWeb(manifest, sessions, vocab, backendUsed);
  }

  constructor(manifest, sessions, vocab, backend) {
    this.manifest = manifest;
    this.sessions = sessions;
    this.vocab = vocab;
    this.backend = backend;
    this.pieceCache = new Map();
  }

  /** Bytes of a text token, or null for a special token. */
  tokenBytes(id) {
    if (id < this.vocab.first_id) return null;
    let bytes = this.pieceCache.get(id);
    if (!bytes) {
      const b64 = this.vocab.pieces[id - this.vocab.first_id] ?? "";
      bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      this.pieceCache.set(id, bytes);
    }
    return bytes;
  }

  stream(options = {}) {
    return new Stream(this, options);
  }

  /** Whole-file transcription (samples: Float32Array at 16 kHz). */
  async transcribe(samples, { delayMs, onProgress } = {}) {
    const stream = this.stream({ delayMs });
    const piece = this.manifest.audio.samples_per_step * 25; // 2 s per push: progress without per-step overhead
    for (let start = 0; start < samples.length; start += piece) {
      await stream.feed(samples.subarray(start, start + piece));
      if (onProgress) onProgress(Math.min(1, (start + piece) / samples.length));
    }
    await stream.finish();
    return stream.result();
  }
}

class GraphState {
  constructor(graph) {
    this.specs = graph.state;
    this.reset();
  }
  reset() {
    this.dispose();
    this.values = {};
    for (const s of this.specs) {
      const size = s.shape.reduce((a, b) => a * b, 1);
      this.values[s.input] = new ort.Tensor("float32", new Float32Array(size).fill(s.fill), s.shape);
    }
  }
  update(results) {
    const old = this.values;
    this.values = {};
    for (const s of this.specs) this.values[s.input] = results[s.output];
    for (const t of Object.values(old)) if (t.location === "gpu-buffer") t.dispose();
  }
  dispose() {
    for (const t of Object.values(this.values || {})) if (t.location === "gpu-buffer") t.dispose();
  }
}

/** Growable float32 queue: append at the end, consume from the front. */
class SampleQueue {
  constructor() {
    this.data = new Float32Array(1 << 16);
    this.start = 0;
    this.end = 0;
  }
  get length() {
    return this.end - this.start;
  }
  push(samples) {
    if (this.end + samples.length > this.data.length) {
      const keep = this.data.subarray(this.start, this.end);
      const grown = new Float32Array(Math.max(this.data.length, 2 * (keep.length + samples.length)));
      grown.set(keep);
      this.data = grown;
      this.end = keep.length;
      this.start = 0;
    }
    this.data.set(samples, this.end);
    this.end += samples.length;
  }
  peek(n) {
    return this.data.slice(this.start, this.start + n);
  }
  drop(n) {
    this.start += n;
  }
}

const ASCII_SPACE = new Set([9, 10, 11, 12, 13, 32]);

/** One live transcription: feed() 16 kHz samples as they come, finish() at the end. */
export class Stream {
  constructor(model, { delayMs, continueAfterEos = false, onText = () => {}, onWord = () => {} } = {}) {
    const m = model.manifest;
    this.model = model;
    this.delayMs = delayMs ?? m.delay.default_ms;
    this.delayTokens = Math.round(this.delayMs / m.delay.token_ms);
    this.stepSamples = m.audio.samples_per_step;
    this.stepWindow = m.audio.step_window;
    this.framesPerStep = m.encoder.frames_per_step;
    this.continueAfterEos = continueAfterEos;
    this.onText = onText;
    this.onWord = onWord;
    this.audioState = new GraphState(m.graphs.audio);
    this.decoderState = new GraphState(m.graphs.decoder);
    this.tokens = [];
    this.text = "";
    this.words = [];
    this.samplesFed = 0;
    this.busy = Promise.resolve();
    this.wordBytes = [];
    this.wordFirst = 0;
    this.wordLast = 0;
    this.boundary = true;
    this.startSegment(0);
  }

  startSegment(firstStep) {
    const m = this.model.manifest;
    const s = m.special;
    this.prompt = [s.bos, ...new Array(m.audio.n_left_pad_tokens + this.delayTokens).fill(s.streaming_pad)];
    this.audioState.reset();
    this.decoderState.reset();
    this.queue = new SampleQueue();
    this.queue.push(new Float32Array(m.audio.window_size / 2)); // the first frame is centred on sample 0
    this.queue.push(new Float32Array(m.audio.n_left_pad_tokens * this.stepSamples));
    this.pushed = m.audio.n_left_pad_tokens * this.stepSamples;
    this.stepsEncoded = 0;
    this.embeddings = [];
    this.position = 0;
    this.limit = null;
    this.stopped = false;
    this.chosen = 0;
    this.segmentStep = firstStep;
    this.segmentTokens = 0;
    this.utf8 = new TextDecoder("utf-8");
  }

  /** Add samples (Float32Array, 16 kHz mono) and run every step they allow; resolves with the new text. */
  feed(samples) {
    this.samplesFed += samples.length;
    if (!this.stopped) {
      this.queue.push(samples);
      this.pushed += samples.length;
    }
    return this.serialize(() => this.run());
  }

  /** End of audio: pad with silence so the last words come out. */
  finish() {
    return this.serialize(async () => {
      if (!this.stopped) {
        const m = this.model.manifest;
        const real = this.pushed - m.audio.n_left_pad_tokens * this.stepSamples;
        const steps = this.delayTokens + m.delay.right_pad_extra_tokens;
        const right = ((this.stepSamples - (real % this.stepSamples)) % this.stepSamples) + steps * this.stepSamples;
        this.queue.push(new Float32Array(right));
        this.pushed += right;
        this.limit = Math.floor(this.pushed / this.stepSamples) - 1;
        this.queue.push(new Float32Array(m.audio.window_size / 2));
        await this.run();
      }
      this.emit(this.utf8.decode());
      this.closeWord(null);
      const duration = this.samplesFed / this.model.manifest.audio.sample_rate;
      for (const w of this.words) {
        w.start = Math.min(w.start, duration);
        w.end = Math.min(w.end, duration);
      }
    });
  }

  serialize(work) {
    // feed() calls from audio callbacks may overlap: the steps must run one after another
    const next = this.busy.then(work);
    this.busy = next.catch(() => {});
    return next;
  }

  async run() {
    while (this.queue.length >= this.stepWindow) {
      await this.audioStep(this.queue.peek(this.stepWindow));
      this.queue.drop(this.stepSamples);
      while (this.decodable()) await this.decoderStep();
    }
    while (this.decodable()) await this.decoderStep();
  }

  decodable() {
    if (this.stopped || this.embeddings.length === 0) return false;
    return this.limit === null || this.position < this.limit;
  }

  async audioStep(window) {
    const feeds = {
      samples: new ort.Tensor("float32", window, [window.length]),
      position: new ort.Tensor("int64", BigInt64Array.of(BigInt(this.stepsEncoded * this.framesPerStep)), [1]),
      ...this.audioState.values,
    };
    const results = await this.model.sessions.audio.run(feeds);
    this.audioState.update(results);
    this.embeddings.push(results.embedding);
    this.stepsEncoded += 1;
  }

  async decoderStep() {
    const prompted = this.position < this.prompt.length;
    const token = prompted ? this.prompt[this.position] : this.chosen;
    const feeds = {
      token: new ort.Tensor("int64", BigInt64Array.of(BigInt(token)), [1]),
      audio: this.embeddings.shift(),
      position: new ort.Tensor("int64", BigInt64Array.of(BigInt(this.position)), [1]),
      delay: new ort.Tensor("float32", Float32Array.of(this.delayTokens), [1]),
      ...this.decoderState.values,
    };
    const results = await this.model.sessions.decoder.run(feeds);
    this.decoderState.update(results);
    feeds.audio.dispose?.();
    this.position += 1;
    if (this.position >= this.prompt.length) {
      this.chosen = Number((await results.next_token.getData())[0]);
      this.onToken(this.chosen);
    }
  }

  onToken(token) {
    const special = this.model.manifest.special;
    const step = this.segmentStep + this.segmentTokens;
    this.segmentTokens += 1;
    this.tokens.push(token);
    const bytes = this.model.tokenBytes(token);
    if (bytes === null) {
      this.emit(this.utf8.decode()); // a special token ends a run of text bytes, as in mistral-common
      if (token === special.streaming_word) this.boundary = true;
    } else {
      this.emit(this.utf8.decode(bytes, { stream: true }));
      this.pushWordPiece(step, bytes);
    }
    if (token === special.eos) {
      if (this.continueAfterEos) {
        // an always-on microphone: a fresh segment from the next step (audio already queued is dropped; the
        // model said EOS because it heard nothing worth transcribing)
        this.startSegment(step + 1);
        this.stopped = false;
      } else {
        this.stopped = true;
      }
    }
  }

  pushWordPiece(step, bytes) {
    const isSpace = bytes.length > 0 && ASCII_SPACE.has(bytes[0]); // bytes.isspace() in Python
    if (this.wordBytes.length && (this.boundary || isSpace)) this.closeWord(step);
    if (!this.wordBytes.length) this.wordFirst = step;
    this.wordBytes.push(...bytes);
    this.wordLast = step;
    this.boundary = false;
  }

  closeWord(nextStart) {
    if (!this.wordBytes.length) return;
    const stepS = this.model.manifest.delay.token_ms / 1000;
    const text = new TextDecoder().decode(Uint8Array.from(this.wordBytes)).trim();
    const endStep = nextStart === null ? this.wordLast + 1 : Math.min(this.wordLast + 1, nextStart);
    this.wordBytes = [];
    if (text) {
      const word = { text, start: this.wordFirst * stepS, end: endStep * stepS };
      this.words.push(word);
      this.onWord(word);
    }
  }

  emit(text) {
    if (text) {
      this.text += text;
      this.onText(text);
    }
  }

  result() {
    return { text: this.text, tokens: [...this.tokens], delay_ms: this.delayMs, words: this.words.map((w) => ({ ...w })) };
  }
}

export { ort };
