// The public API, as any client uses it. The key lives in this tab's sessionStorage and goes out
// only as `Authorization: Bearer` (never in a URL, never logged). Jobs are followed through
// `stream/{id}` read with fetch (EventSource cannot send that header), falling back to polling
// `fetch` when the stream cannot be read.

export const API = "/api/v1/enterprise";
const KEY_ITEM = "sdapi.key";
const POLL_MS = 1000;

export const session = {
  get key() {
    return sessionStorage.getItem(KEY_ITEM) || "";
  },
  set key(value) {
    if (value) sessionStorage.setItem(KEY_ITEM, value);
    else sessionStorage.removeItem(KEY_ITEM);
  },
};

/** An error envelope (or a failure to reach the server) as an exception. */
export class ApiError extends Error {
  constructor(status, body) {
    super(messageOf(body));
    this.status = status;
    this.body = body;
  }
}

/** The text of an error envelope's `message` (a field -> messages object for invalid fields). */
export function messageOf(body) {
  if (!body) return "No answer";
  const { message, tip } = body;
  let text = typeof message === "string" ? message
    : message && typeof message === "object"
      ? Object.entries(message).map(([field, problems]) => `${field}: ${[].concat(problems).join(", ")}`).join("; ")
      : "Request failed";
  if (tip) text += ` (${tip})`;
  return text;
}

function headers(extra = {}) {
  return { Authorization: `Bearer ${session.key}`, ...extra };
}

/** POST `body` to an endpoint; the answer's JSON, or an ApiError. */
export async function call(endpoint, body = {}, { signal } = {}) {
  let response;
  try {
    response = await fetch(`${API}/${endpoint}`, {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify(body),
      signal,
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, { message: `The server could not be reached (${error.message})` });
  }
  let data;
  try {
    data = await response.json();
  } catch {
    data = { status: "error", message: `HTTP ${response.status}` };
  }
  if (!response.ok || data.status === "error") throw new ApiError(response.status, data);
  return data;
}

/** The OpenAPI document (public: no key). */
export async function openapi() {
  const response = await fetch("/openapi.json");
  if (!response.ok) throw new ApiError(response.status, { message: "The OpenAPI document could not be read" });
  return response.json();
}

/**
 * Follow job `id` to its end: `onUpdate(body)` with every processing body (progress), then the
 * final body (fetch's) is returned. `how` tells which way it went ("stream" or "polling").
 */
export async function follow(id, onUpdate, { signal, how = () => {} } = {}) {
  try {
    const final = await streamJob(id, onUpdate, signal);
    how("stream");
    return final;
  } catch (error) {
    if (error.name === "AbortError") throw error;
    how("polling");
    return pollJob(id, onUpdate, signal);
  }
}

async function streamJob(id, onUpdate, signal) {
  let lastId = "";
  for (;;) { // a `reconnect` event: again from the last event seen
    const response = await fetch(`${API}/stream/${id}`, {
      headers: headers(lastId ? { "Last-Event-ID": lastId } : {}),
      signal,
      cache: "no-store",
    });
    if (!response.ok || !response.body || !window.TextDecoderStream) throw new Error("no stream");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let reconnect = false;
    while (!reconnect) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n?/g, "\n");
      let cut;
      while (!reconnect && (cut = buffer.indexOf("\n\n")) >= 0) {
        const event = parseEvent(buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
        if (!event) continue;
        if (event.id && /^\d+$/.test(event.id)) lastId = event.id;
        if (event.name === "progress") onUpdate(event.data);
        else if (event.name === "result") {
          reader.cancel().catch(() => {});
          return event.data;
        } else if (event.name === "reconnect") {
          lastId = String(event.data.last_event_id ?? lastId);
          reconnect = true;
        }
      }
    }
    if (!reconnect) throw new Error("the stream ended before the result");
    reader.cancel().catch(() => {});
  }
}

function parseEvent(block) {
  const event = { name: "message", id: "", data: "" };
  let hasData = false;
  for (const line of block.split("\n")) {
    const colon = line.indexOf(":");
    if (colon === 0) continue; // a comment
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event.name = value;
    else if (field === "id") event.id = value;
    else if (field === "data") {
      event.data += (hasData ? "\n" : "") + value;
      hasData = true;
    }
  }
  if (!hasData) return null; // a `retry:` block
  event.data = JSON.parse(event.data);
  return event;
}

async function pollJob(id, onUpdate, signal) {
  for (;;) {
    const body = await call("fetch", { request_id: id }, { signal });
    if (body.status !== "processing") return body;
    onUpdate(body);
    await new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, POLL_MS);
      signal?.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(new DOMException("Aborted", "AbortError"));
      }, { once: true });
    });
  }
}
