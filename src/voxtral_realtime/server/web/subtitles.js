// Transcript files from timed words, grouped into sentence-like segments by the same rules as the Python
// package (voxtral_realtime.transcription.Transcription.segments and voxtral_realtime.writers), so a file
// saved from the page matches the server's srt/vtt output for the same words.

const SEGMENT_PAUSE_S = 1.0;
const SEGMENT_MAX_CHARS = 84;
const SENTENCE_END = /[.!?…。！？]['")\]]*$/u;

const codePoints = (text) => [...text].length; // Python's len() counts code points, not UTF-16 units

function joinWords(words) {
  return words.map((w) => w.word).join(" ");
}

function makeSegment(words) {
  return { text: joinWords(words), start: words[0].start, end: words[words.length - 1].end };
}

/** @param {{word: string, start: number, end: number}[]} words */
export function segments(words) {
  const out = [];
  let current = [];
  for (const word of words) {
    if (current.length && (word.start - current[current.length - 1].end > SEGMENT_PAUSE_S
        || codePoints(joinWords(current)) + 1 + codePoints(word.word) > SEGMENT_MAX_CHARS)) {
      out.push(makeSegment(current));
      current = [];
    }
    current.push(word);
    if (SENTENCE_END.test(word.word)) {
      out.push(makeSegment(current));
      current = [];
    }
  }
  if (current.length) out.push(makeSegment(current));
  return out;
}

const milliseconds = (seconds) => Math.max(0, Math.round(seconds * 1000));

function clock(millis, decimalMarker) {
  const hours = Math.floor(millis / 3600000);
  millis -= hours * 3600000;
  const minutes = Math.floor(millis / 60000);
  millis -= minutes * 60000;
  const secs = Math.floor(millis / 1000);
  millis -= secs * 1000;
  const pad = (n, width) => String(n).padStart(width, "0");
  return `${pad(hours, 2)}:${pad(minutes, 2)}:${pad(secs, 2)}${decimalMarker}${pad(millis, 3)}`;
}

export function toTxt(text) {
  return text.trim() + "\n";
}

/** A cue's times, at least a millisecond long, the millisecond added after rounding (as writers._cue_span). */
function cueSpan(segment, decimalMarker) {
  const start = milliseconds(segment.start);
  const end = Math.max(milliseconds(segment.end), start + 1);
  return `${clock(start, decimalMarker)} --> ${clock(end, decimalMarker)}`;
}

export function toSrt(words) {
  return segments(words).map((s, i) => `${i + 1}\n${cueSpan(s, ",")}\n${s.text}\n`).join("\n");
}

export function toVtt(words) {
  const blocks = segments(words).map((s) => `${cueSpan(s, ".")}\n${s.text}\n`);
  return ["WEBVTT\n", ...blocks].join("\n");
}

/** 16-bit mono WAV file bytes of PCM16 samples. */
export function toWav(pcm, sampleRate) {
  const header = new DataView(new ArrayBuffer(44));
  const ascii = (offset, text) => [...text].forEach((c, i) => header.setUint8(offset + i, c.charCodeAt(0)));
  ascii(0, "RIFF");
  header.setUint32(4, 36 + pcm.byteLength, true);
  ascii(8, "WAVE");
  ascii(12, "fmt ");
  header.setUint32(16, 16, true);
  header.setUint16(20, 1, true); // PCM
  header.setUint16(22, 1, true); // mono
  header.setUint32(24, sampleRate, true);
  header.setUint32(28, sampleRate * 2, true);
  header.setUint16(32, 2, true);
  header.setUint16(34, 16, true);
  ascii(36, "data");
  header.setUint32(40, pcm.byteLength, true);
  return new Blob([header.buffer, pcm.buffer.slice(pcm.byteOffset, pcm.byteOffset + pcm.byteLength)],
    { type: "audio/wav" });
}
