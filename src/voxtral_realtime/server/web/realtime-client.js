// A client of the server's /v1/realtime WebSocket (vLLM's realtime transcription protocol, plus our
// transcription.words events).  Browsers cannot set an Authorization header on a WebSocket, so an API key
// travels as the subprotocol "api-key.KEY" next to "voxtral-realtime", which the server selects.

const SUBPROTOCOL = "voxtral-realtime";

export function pcm16ToBase64(pcm) {
  // Int16Array is little-endian on every platform browsers run on, as the protocol wants
  const bytes = new Uint8Array(pcm.buffer, pcm.byteOffset, pcm.byteLength);
  let binary = "";
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + chunk));
  }
  return btoa(binary);
}

export class RealtimeClient {
  /**
   * @param {string} url ws:// or wss:// address of /v1/realtime
   * @param {{apiKey?: string, onDelta?: Function, onWords?: Function, onDone?: Function, onError?: Function,
   *          onClose?: Function}} handlers
   */
  constructor(url, handlers = {}) {
    this.url = url;
    this.handlers = handlers;
    this.socket = null;
  }

  /** Connect; resolves with the session.created event, rejects with the server's reason if it refuses. */
  open() {
    const protocols = [SUBPROTOCOL];
    if (this.handlers.apiKey) protocols.push(`api-key.${this.handlers.apiKey}`);
    return new Promise((resolve, reject) => {
      let created = false;
      const socket = new WebSocket(this.url, protocols);
      this.socket = socket;
      socket.onmessage = (message) => {
        const event = JSON.parse(message.data);
        if (created) {
          this.#dispatch(event);
        } else if (event.type === "session.created") {
          created = true;
          resolve(event);
        } else if (event.type === "error") {
          reject(new Error(event.error)); // refused: a wrong API key, or too many connections
        }
      };
      socket.onclose = (close) => {
        if (created) this.handlers.onClose?.(close);
        else reject(new Error("the server closed the connection"));
      };
      socket.onerror = () => {}; // onclose follows, with the details there are
    });
  }

  /** Name the model ("" = the served one) and set our options: delay_ms, word_timestamps, continue_after_eos. */
  update(options) {
    this.#send({ type: "session.update", model: "", ...options });
  }

  start() {
    this.#send({ type: "input_audio_buffer.commit", final: false });
  }

  appendPcm16(pcm) {
    this.#send({ type: "input_audio_buffer.append", audio: pcm16ToBase64(pcm) });
  }

  /** End of audio: the server flushes the last words and answers with transcription.done. */
  finish() {
    this.#send({ type: "input_audio_buffer.commit", final: true });
  }

  close() {
    this.socket?.close();
  }

  #send(event) {
    if (this.socket?.readyState === WebSocket.OPEN) this.socket.send(JSON.stringify(event));
  }

  #dispatch(event) {
    const h = this.handlers;
    if (event.type === "transcription.delta") h.onDelta?.(event.delta);
    else if (event.type === "transcription.words") h.onWords?.(event.words);
    else if (event.type === "transcription.done") h.onDone?.(event);
    else if (event.type === "error") h.onError?.(event);
  }
}
