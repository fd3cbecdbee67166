// The page: load the export next to it (or ?export=URL), then caption the microphone live or transcribe a file.
// Everything runs here; window.voxtralPage exposes the state for automated tests.

import { toSrt, toTxt } from "./subtitles.js";
import { LoadError, VoxtralWeb } from "./voxtral.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const exportUrl = params.get("export") || "./";
const page = { model: null, stream: null, result: null, status: "idle", error: null, live: null };
window.voxtralPage = page;

function showError(message) {
  page.error = message;
  $("error").textContent = message;
  $("error").hidden = false;
}

function setStatus(text, state) {
  $("status").textContent = text;
  if (state) page.status = state;
}

function enableControls(on) {
  for (const id of ["mic", "file"]) $(id).disabled = !on;
}

function setResult(result) {
  page.result = result;
  for (const id of ["download-txt", "download-srt"]) $(id).disabled = !result;
}

async function load() {
  $("load").disabled = true;
  $("error").hidden = true;
  $("progress").hidden = false;
  setStatus("downloading the model (kept in the browser cache for the next visit)", "loading");
  try {
    page.model = await VoxtralWeb.load(exportUrl, {
      backend: $("backend-choice").value,
      onProgress: (done, total, what) => {
        $("progress").value = done / total;
        $("progress-text").textContent = `${(done / 1e6).toFixed(1)} / ${(total / 1e6).toFixed(1)} MB (${what})`;
      },
    });
  } catch (err) {
    $("load").disabled = false;
    setStatus("", "failed");
    showError(err instanceof LoadError ? err.message : `could not start the model: ${err.message}`);
    return;
  }
  const m = page.model.manifest;
  $("backend").textContent = `${m.model} (${m.quant}) on ${page.model.backend === "webgpu" ? "WebGPU" : "WebAssembly"}`;
  const delays = [...Array(15).keys()].map((i) => 80 * (i + 1)).concat([2400]);
  $("delay").replaceChildren(...delays.map((d) => new Option(`${d} ms`, d, false, d === m.delay.default_ms)));
  enableControls(true);
  setStatus("ready", "ready");
}

async function startMic() {
  const model = page.model;
  let media;
  try {
    media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false },
    });
  } catch (err) {
    const denied = err.name === "NotAllowedError" || err.name === "SecurityError";
    showError(denied ? "microphone permission denied: allow it in the browser's site settings and try again"
      : `no microphone (${err.message})`);
    return;
  }
  $("error").hidden = true;
  const context = new AudioContext();
  // the server page's capture worklet (copied into the export with its resampler): 80 ms PCM16 frames at 16 kHz
  await context.audioWorklet.addModule(new URL("pcm-capture.worklet.js", import.meta.url));
  const source = context.createMediaStreamSource(media);
  // one input channel: the node mixes the microphone down to mono
  const capture = new AudioWorkletNode(context, "pcm16-capture", {
    numberOfInputs: 1, numberOfOutputs: 1, channelCount: 1, channelCountMode: "explicit",
    channelInterpretation: "speakers",
  });
  const captions = $("captions");
  captions.textContent = "";
  setResult(null);
  const stream = model.stream({
    delayMs: Number($("delay").value),
    continueAfterEos: true, // an always-on microphone goes on after a silence the model ends with EOS
    onText: (text) => { captions.textContent += text; },
  });
  page.captured = []; // the 16 kHz blocks fed to the model, for tests that replay them elsewhere
  capture.port.onmessage = (event) => {
    if (event.data.type === "flushed") {
      page.live?.flushed();
      return;
    }
    const samples = Float32Array.from(event.data.pcm, (v) => v / 32768);
    page.captured.push(samples);
    stream.feed(samples).catch((err) => showError(`transcription failed: ${err.message}`));
  };
  source.connect(capture);
  capture.connect(context.destination); // it outputs silence; connected, every browser keeps pulling it
  page.stream = stream;
  page.live = { context, media, source, capture };
  $("mic").textContent = "Stop microphone";
  $("file").disabled = true;
  setStatus(`listening (${context.sampleRate} Hz resampled to 16 kHz)`, "listening");
}

async function stopMic() {
  const { context, media, source, capture } = page.live;
  source.disconnect();
  // the resampler's last samples (and a part-filled frame) come back before the worklet stops
  await new Promise((resolve) => {
    page.live.flushed = resolve;
    capture.port.postMessage({ type: "flush" });
  });
  capture.port.onmessage = null;
  media.getTracks().forEach((t) => t.stop());
  await context.close();
  page.live = null;
  setStatus("finishing", "finishing");
  await page.stream.finish();
  setResult(page.stream.result());
  $("mic").textContent = "Start microphone";
  $("file").disabled = false;
  setStatus("done", "done");
}

/** Decode any file the browser can play at 16 kHz (a context decodes to its own rate: a 16 kHz file is then
 * not resampled at all) and mix it down to mono. */
async function decodeFile(file) {
  const bytes = await file.arrayBuffer();
  const decoded = await new OfflineAudioContext(1, 1, 16000).decodeAudioData(bytes);
  if (decoded.numberOfChannels === 1) return decoded.getChannelData(0);
  const mono = new Float32Array(decoded.length);
  for (let c = 0; c < decoded.numberOfChannels; c++) {
    const channel = decoded.getChannelData(c);
    for (let i = 0; i < mono.length; i++) mono[i] += channel[i] / decoded.numberOfChannels;
  }
  return mono;
}

async function transcribeFile(file) {
  enableControls(false);
  $("error").hidden = true;
  setResult(null);
  const captions = $("captions");
  captions.textContent = "";
  setStatus(`decoding ${file.name}`, "transcribing");
  try {
    const samples = await decodeFile(file);
    const started = performance.now();
    const stream = page.model.stream({
      delayMs: Number($("delay").value),
      onText: (text) => { captions.textContent += text; },
    });
    page.stream = stream;
    const piece = 16000 * 2;
    for (let start = 0; start < samples.length; start += piece) {
      await stream.feed(samples.subarray(start, start + piece));
      setStatus(`transcribing ${file.name}: ${Math.min(100, (100 * (start + piece)) / samples.length).toFixed(0)}%`);
    }
    await stream.finish();
    const seconds = (performance.now() - started) / 1000;
    setResult(stream.result());
    setStatus(`done: ${(samples.length / 16000).toFixed(1)} s of audio in ${seconds.toFixed(1)} s `
      + `(real-time factor ${(seconds / (samples.length / 16000)).toFixed(2)})`, "done");
  } catch (err) {
    showError(`${file.name}: ${err.message}`);
    setStatus("", "failed");
  } finally {
    enableControls(true);
  }
}

function download(name, text) {
  const url = URL.createObjectURL(new Blob([text], { type: "text/plain;charset=utf-8" }));
  const a = Object.assign(document.createElement("a"), { href: url, download: name });
  a.click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

$("load").addEventListener("click", load);
$("mic").addEventListener("click", () => (page.live ? stopMic() : startMic()));
$("file").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) transcribeFile(file);
});
$("download-txt").addEventListener("click", () => download("transcript.txt", toTxt(page.result.text)));
$("download-srt").addEventListener("click", () => download("transcript.srt",
  toSrt(page.result.words.map((w) => ({ word: w.text, start: w.start, end: w.end })))));
if (params.get("autoload") === "1") load();
