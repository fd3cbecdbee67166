// The page: live captions from the microphone over /v1/realtime, file transcription over
// /v1/audio/transcriptions, and the transcript as TXT, SRT or VTT.  Plain ES modules, no build step.
import { RealtimeClient } from "./realtime-client.js";
import { toSrt, toTxt, toVtt, toWav } from "./subtitles.js";

const DELAYS_MS = [80, 160, 240, 320, 400, 480, 560, 640, 720, 800, 880, 960, 1040, 1120, 1200, 2400];
const DEFAULT_DELAY_MS = 480;
const SAMPLE_RATE = 16000;
const FAST_WORD_S = 0.15; // latency colouring of the word list
const SLOW_WORD_S = 0.5;

const $ = (id) => document.getElementById(id);

function setState(state, message) {
  document.body.dataset.state = state;
  if (message !== undefined) $("status").textContent = message;
}

function percentile(sorted, fraction) {
  return sorted[Math.min(sorted.length - 1, Math.floor(fraction * sorted.length))];
}

/** The transcript on screen: decided text, the word still in progress, and the timed words. */
class TranscriptView {
  constructor() {
    this.reset();
  }

  reset() {
    this.text = "";
    this.words = [];
    this.finalLength = 0; // characters of text covered by completed words
    this.unplaced = []; // completed words not yet found in the text
    $("final-text").textContent = "";
    $("tail-text").textContent = "";
    $("words").replaceChildren();
    $("latency-summary").textContent = "";
  }

  addText(delta) {
    this.text += delta;
    this.#render();
  }

  /** Completed words: everything up to the last of them is final; the text after it is the word in progress
   * (its next token may still continue it), shown apart. */
  addWords(words) {
    this.words.push(...words);
    this.unplaced.push(...words);
    $("words").append(...words.map((w) => this.#wordItem(w)));
    this.#summarize();
    this.#render();
  }

  /** The final text and words of a finished transcription replace the live ones. */
  complete(text, words) {
    this.text = text;
    this.finalLength = text.length;
    this.unplaced = [];
    if (words) {
      this.words = words;
      $("words").replaceChildren(...words.map((w) => this.#wordItem(w)));
      this.#summarize();
    }
    this.#render();
  }

  #render() {
    while (this.unplaced.length) {
      const at = this.text.indexOf(this.unplaced[0].word, this.finalLength);
      if (at < 0) break; // its text has not arrived yet
      this.finalLength = at + this.unplaced.shift().word.length;
    }
    $("final-text").textContent = this.text.slice(0, this.finalLength);
    $("tail-text").textContent = this.text.slice(this.finalLength);
  }

  #wordItem(word) {
    const item = document.createElement("li");
    item.textContent = word.word;
    item.title = `${word.start.toFixed(2)}–${word.end.toFixed(2)} s`;
    if (word.latency !== null && word.latency !== undefined) {
      const latency = document.createElement("span");
      latency.className = "latency";
      latency.textContent = `${Math.round(word.latency * 1000)} ms`;
      item.append(latency);
      item.classList.add(word.latency < FAST_WORD_S ? "fast" : word.latency > SLOW_WORD_S ? "slow" : "ok");
    }
    return item;
  }

  #summarize() {
    const latencies = this.words.map((w) => w.latency).filter((l) => l !== null && l !== undefined);
    if (!latencies.length) return;
    latencies.sort((a, b) => a - b);
    const ms = (s) => `${Math.round(s * 1000)} ms`;
    $("latency-summary").textContent =
      `latency p50 ${ms(percentile(latencies, 0.5))}, p99 ${ms(percentile(latencies, 0.99))} (${latencies.length} words)`;
  }
}

/** One microphone transcription: capture -> AudioWorklet (16 kHz PCM16) -> WebSocket -> captions. */
class MicrophoneSession {
  constructor(view, { delayMs, apiKey, keepAudio, onFinished }) {
    this.view = view;
    this.options = { delayMs, apiKey, keepAudio };
    this.onFinished = onFinished;
    this.kept = [];
    this.ended = false;
  }

  async start() {
    setState("connecting", "Connecting…");
    const url = new URL("v1/realtime", window.location.href);
    url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
    this.client = new RealtimeClient(url.href, {
      apiKey: this.options.apiKey,
      onDelta: (delta) => this.view.addText(delta),
      onWords: (words) => this.view.addWords(words),
      onDone: (event) => this.#done(event),
      onError: (event) => this.#fail(`Server error (${event.code}): ${event.error}`, event.code),
      onClose: () => this.#fail("The connection to the server was lost."),
    });
    await this.client.open();
    this.client.update({ delay_ms: this.options.delayMs, word_timestamps: true, continue_after_eos: true });
    this.client.start();
    this.media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
    this.context = new AudioContext();
    await this.context.audioWorklet.addModule(new URL("pcm-capture.worklet.js", import.meta.url));
    this.node = new AudioWorkletNode(this.context, "pcm16-capture", {
      numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1, channelCountMode: "explicit",
      channelInterpretation: "speakers",
    });
    this.node.port.onmessage = (event) => this.#onWorkletMessage(event.data);
    this.context.createMediaStreamSource(this.media).connect(this.node);
    // the node outputs silence; connecting it keeps the graph pulling it in every browser
    this.node.connect(this.context.destination);
    setState("live", `Listening (${this.context.sampleRate} Hz, sent as 16 kHz)…`);
  }

  /** Stop capturing; the server flushes the last words and sends the final transcript. */
  stop() {
    if (!this.node) return;
    setState("finishing", "Finishing the last words…");
    this.node.port.postMessage({ type: "flush" });
  }

  /** Give up (the start failed): release the microphone and the connection. */
  abort() {
    this.ended = true;
    this.#release();
    this.client?.close();
  }

  keptAudio() {
    const total = this.kept.reduce((n, pcm) => n + pcm.length, 0);
    const all = new Int16Array(total);
    let offset = 0;
    for (const pcm of this.kept) {
      all.set(pcm, offset);
      offset += pcm.length;
    }
    return all;
  }

  #onWorkletMessage(message) {
    if (message.type === "audio") {
      if (this.options.keepAudio) this.kept.push(message.pcm);
      this.client.appendPcm16(message.pcm);
    } else if (message.type === "flushed") {
      this.#release();
      this.client.finish();
    }
  }

  #done(event) {
    this.ended = true;
    this.view.complete(event.text, event.words);
    this.client.close();
    setState("done", `Done: ${event.duration.toFixed(1)} s of audio, delay ${event.delay_ms} ms.`);
    this.onFinished(this);
  }

  #fail(message, code) {
    if (this.ended) return;
    if (code === "idle_timeout" || code === undefined || code === "busy" || code === "processing_error") {
      this.ended = true;
      this.#release();
      this.client.close();
    }
    setState("error", message);
    if (this.ended) this.onFinished(this);
  }

  #release() {
    this.media?.getTracks().forEach((track) => track.stop());
    this.node?.disconnect();
    this.context?.close();
    this.node = null;
  }
}

async function transcribeFile(file, view, { delayMs, apiKey }) {
  setState("uploading", `Transcribing ${file.name}…`);
  const form = new FormData();
  form.append("file", file);
  form.append("model", "");
  form.append("response_format", "verbose_json");
  form.append("timestamp_granularities[]", "word");
  form.append("delay_ms", String(delayMs));
  const headers = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
  const response = await fetch(new URL("v1/audio/transcriptions", window.location.href), {
    method: "POST", body: form, headers,
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    throw new Error(body.error?.message ?? `the server answered ${response.status}`);
  }
  view.reset();
  view.complete(body.text, body.words);
  setState("done", `Done: ${file.name}, ${body.duration.toFixed(1)} s of audio.`);
}

function download(name, content) {
  const blob = content instanceof Blob ? content : new Blob([content], { type: "text/plain;charset=utf-8" });
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
}

function setupPage() {
  const view = new TranscriptView();
  const params = new URLSearchParams(window.location.search);
  const delay = $("delay");
  for (const ms of DELAYS_MS) delay.append(new Option(`${ms} ms`, String(ms), false, ms === DEFAULT_DELAY_MS));
  const apiKey = $("api-key");
  apiKey.value = sessionStorage.getItem("voxtral-api-key") ?? "";
  apiKey.addEventListener("change", () => sessionStorage.setItem("voxtral-api-key", apiKey.value));
  $("keep-audio").checked = params.get("keep_audio") === "1";

  let session = null;
  let lastAudio = null;
  const settings = () => ({ delayMs: Number(delay.value), apiKey: apiKey.value.trim(),
    keepAudio: $("keep-audio").checked });
  const setBusy = (busy) => {
    $("mic-start").disabled = busy;
    $("mic-stop").disabled = !busy;
    $("file-input").disabled = busy;
    const nothing = busy || !view.text;
    for (const id of ["download-txt", "download-srt", "download-vtt"]) $(id).disabled = nothing;
    $("download-wav").disabled = busy;
  };
  const finished = (done) => {
    setBusy(false);
    lastAudio = done.options.keepAudio ? done.keptAudio() : null;
    $("download-wav").hidden = !lastAudio;
    session = null;
  };

  $("mic-start").addEventListener("click", async () => {
    view.reset();
    setBusy(true);
    session = new MicrophoneSession(view, { ...settings(), onFinished: finished });
    try {
      await session.start();
    } catch (error) {
      setState("error", `Could not start: ${error.message}`);
      session.abort();
      setBusy(false);
      session = null;
    }
  });
  $("mic-stop").addEventListener("click", () => session?.stop());
  $("file-input").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (!file) return;
    setBusy(true);
    $("mic-stop").disabled = true;
    try {
      await transcribeFile(file, view, settings());
    } catch (error) {
      setState("error", `Could not transcribe ${file.name}: ${error.message}`);
    } finally {
      setBusy(false);
      $("mic-stop").disabled = true;
      event.target.value = "";
    }
  });
  $("download-txt").addEventListener("click", () => download("transcript.txt", toTxt(view.text)));
  $("download-srt").addEventListener("click", () => download("transcript.srt", toSrt(view.words)));
  $("download-vtt").addEventListener("click", () => download("transcript.vtt", toVtt(view.words)));
  $("download-wav").addEventListener("click", () => lastAudio && download("recording.wav",
    toWav(lastAudio, SAMPLE_RATE)));
  setBusy(false);
}

setupPage();
