// The admin API client: the token for this browser session, the Bearer header on every call, errors as
// ApiError, a 401 anywhere signs the console out. Paths are relative to the admin root (the parent of /console/).

const TOKEN_KEY = "agent-gateway.admin-token";
export const ROOT = new URL("../", import.meta.url);

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** Who the token says it is, for display only (the server decides): a JWT's sub and role, else the admin token. */
export function whoami() {
  const parts = (token.get() || "").split(".");
  if (parts.length !== 3) return "admin token";
  try {
    const claims = JSON.parse(atob(parts[1].replace(/-/g, "+").replace(/_/g, "/")));
    return `${claims.sub ?? "?"} (${claims.role ?? "?"})`;
  } catch {
    return "token";
  }
}

const listeners = {unauthorized: [], status: []};
/** on("unauthorized", fn(message)) | on("status", fn(ok, message)): API reachability for the header. */
export function on(event, fn) {
  listeners[event].push(fn);
}
const emit = (event, ...args) => listeners[event].forEach((fn) => fn(...args));

// Server clock minus ours (ms), from the Date header: countdowns to `expires_at` stay right on a skewed laptop.
// Date has a one-second resolution, so smaller differences are noise.
let skew = 0;
export const serverNow = () => (Date.now() + skew) / 1000;
function learnSkew(response) {
  const date = Date.parse(response.headers.get("Date") || "");
  if (Number.isNaN(date)) return;
  const diff = date - Date.now();
  skew = Math.abs(diff) > 1500 ? diff : 0;
}

export function url(path, query = {}) {
  const u = new URL(path.replace(/^\//, ""), ROOT);
  for (const [key, value] of Object.entries(query)) if (value != null && value !== "") u.searchParams.set(key, value);
  return u;
}

export function authHeaders(extra = {}) {
  const value = token.get();
  if (!value) throw new ApiError(401, "unauthenticated", "not signed in");
  return {Authorization: `Bearer ${value}`, ...extra};
}

/** Turn a non-2xx response into an ApiError (reading the gateway's {"error": {type, message}} when there is one). */
export async function failure(response) {
  let type = "http_error";
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error) {
      type = String(body.error.type ?? type);
      message = String(body.error.message ?? message);
    }
  } catch {
    // not JSON (a proxy's page, aiohttp's plain 404): keep the status line
  }
  if (response.status === 401) {
    token.clear();
    emit("unauthorized", message);
  }
  return new ApiError(response.status, type, message);
}

/** api("/approvals", {query, method, body, signal}) -> parsed JSON; throws ApiError. */
export async function api(path, {query, method = "GET", body, signal} = {}) {
  const headers = authHeaders({Accept: "application/json"});
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let response;
  try {
    response = await fetch(url(path, query), {
      method, headers, signal, cache: "no-store",
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    emit("status", false, "gateway unreachable");
    throw new ApiError(0, "network", "the gateway's admin port is unreachable");
  }
  learnSkew(response);
  emit("status", response.status < 500, response.status < 500 ? "" : `HTTP ${response.status}`);
  if (!response.ok) throw await failure(response);
  return response.status === 204 ? null : response.json();
}

/** GET /readyz: public, no token needed; {ready, policy_version} also on 503 (draining). */
export async function readiness() {
  const response = await fetch(url("/readyz"), {cache: "no-store"});
  learnSkew(response);
  return {status: response.status, body: await response.json().catch(() => ({}))};
}

/** Calls `fn` every `ms` after the previous call finished (never two at once); `now()` runs it at once. */
export class Poller {
  constructor(fn, ms) {
    this.fn = fn;
    this.ms = ms;
    this.timer = 0;
    this.running = false;
    this.again = false;
    this.stopped = true;
  }

  start() {
    this.stopped = false;
    this.now();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  async now() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    if (this.running) {
      this.again = true;
      return;
    }
    this.running = true;
    try {
      await this.fn();
    } catch (error) {
      console.error(error);
    } finally {
      this.running = false;
      if (!this.stopped) this.timer = setTimeout(() => this.now(), this.again ? 0 : this.ms);
      this.again = false;
    }
  }
}
