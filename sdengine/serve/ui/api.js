// The server's A1111 API, as the page calls it: the bearer key (asked for once, kept for the
// browser session), 503 retried after Retry-After, a lost connection reported, never a hang.

const KEY = "sdengine.apiKey";

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === "string" ? detail : `HTTP ${status}`);
    this.status = status;
    this.detail = detail; // FastAPI's: a string, or [{loc: ["body", field, ...], msg}, ...] for 422
  }
}

export class ConnectionLost extends Error {}

export class Api {
  constructor({ askKey, onBusy, onConnection }) {
    this.askKey = askKey;             // async (message) => key or null
    this.onBusy = onBusy;             // (seconds) => void: a 503 is being retried
    this.onConnection = onConnection; // (ok: bool) => void
    this.stopped = null;              // a function that says whether to stop retrying
    this.keyAsked = null;             // the dialog's answer while it is open: every 401 waits for it
  }

  // One dialog however many requests were refused at once.
  obtainKey(message) {
    if (!this.keyAsked) {
      this.keyAsked = this.askKey(message).then((key) => {
        this.keyAsked = null;
        if (key) sessionStorage.setItem(KEY, key);
        return key;
      });
    }
    return this.keyAsked;
  }

  get key() { return sessionStorage.getItem(KEY); }

  async call(method, path, body, { retryBusy = false, timeoutMs = 0, signal } = {}) {
    for (;;) {
      const headers = { "Accept": "application/json" };
      const sentKey = this.key;
      if (body !== undefined) headers["Content-Type"] = "application/json";
      if (sentKey) headers["Authorization"] = `Bearer ${sentKey}`;
      const controller = new AbortController();
      const timer = timeoutMs ? setTimeout(() => controller.abort(), timeoutMs) : null;
      if (signal) signal.addEventListener("abort", () => controller.abort(), { once: true });
      let response;
      try {
        response = await fetch(path, {
          method, headers, signal: controller.signal,
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (e) {
        this.onConnection(false);
        throw new ConnectionLost(signal?.aborted ? "cancelled" : "the connection to the server was lost");
      } finally {
        if (timer) clearTimeout(timer);
      }
      this.onConnection(true);
      if (response.status === 401) {
        if (sentKey && this.key === sentKey) sessionStorage.removeItem(KEY);
        if (this.key && this.key !== sentKey) continue;  // a newer key came meanwhile
        const key = await this.obtainKey(sentKey ? "That key was refused." : "");
        if (!key) throw new ApiError(401, "an API key is needed");
        continue;
      }
      if (response.status === 503 && retryBusy && !(this.stopped && this.stopped())) {
        const wait = Math.min(Math.max(Number(response.headers.get("Retry-After")) || 1, 1), 30);
        this.onBusy(wait);
        await new Promise((resolve) => setTimeout(resolve, wait * 1000));
        if (this.stopped && this.stopped()) throw new ApiError(503, "busy; stopped retrying");
        continue;
      }
      const type = response.headers.get("Content-Type") || "";
      const data = type.includes("json") ? await response.json() : await response.text();
      if (!response.ok) throw new ApiError(response.status, data && data.detail !== undefined ? data.detail : data);
      return data;
    }
  }

  get(path, options) { return this.call("GET", path, undefined, options); }
  post(path, body, options) { return this.call("POST", path, body === undefined ? {} : body, options); }
}
