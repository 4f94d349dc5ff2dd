// pinauth's reference frontend: plain fetch() against pinauth's REST API.
// The session is an HttpOnly cookie, so every call sends credentials: "include".
"use strict";

const API = ""; // same origin; set to pinauth's URL when the frontend lives elsewhere
const $ = (id) => document.getElementById(id);
let bookmark = null;

async function call(method, path, body) {
  const init = { method, credentials: "include", headers: { Accept: "application/json" } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  const text = await response.text();
  const data = text ? JSON.parse(text) : null;
  if (!response.ok) throw Object.assign(new Error("request failed"), { status: response.status, data });
  return data;
}

function show(text, kind = "error", link = null) {
  const box = $("message");
  box.className = `message ${kind}`;
  box.textContent = text;
  if (link) {
    box.append(" ");
    const a = document.createElement("a");
    a.href = link.href;
    a.textContent = link.text;
    box.append(a);
  }
  box.hidden = false;
}

// An error body can be Pinterest's, relayed unchanged by the proxy, so its login_url is
// followed only if it stays on pinauth's own origin: never javascript:, never elsewhere.
function sameOriginLoginUrl(candidate) {
  const base = new URL(API || "/", location.href);
  const fallback = new URL(`${API}/auth/login`, location.href).href;
  if (typeof candidate !== "string" || !candidate) return fallback;
  let url;
  try {
    url = new URL(candidate, base);
  } catch {
    return fallback;
  }
  // blob: URLs report their creator's origin, hence the protocol check as well.
  return url.protocol === base.protocol && url.origin === base.origin ? url.href : fallback;
}

function explain(error) {
  const data = error.data || {};
  if (data.error === "reauthorization_required") {
    show("Pinterest no longer accepts this connection's tokens.", "error",
         { href: sameOriginLoginUrl(data.login_url), text: "Reconnect Pinterest" });
    signedOut();
  } else if (data.error === "not_authenticated") {
    signedOut();
  } else if (data.error) {
    show(`${data.message} (${data.error})`);
  } else if (data.message) {
    show(`Pinterest says: ${data.message}`); // Pinterest's own {code, message}, passed through
  } else {
    show(`Something went wrong (HTTP ${error.status || "?"}).`);
  }
}

function signedOut() {
  $("signed-in").hidden = true;
  $("signed-out").hidden = false;
}

function boardItem(board) {
  const li = document.createElement("li");
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = board.name;
  const meta = document.createElement("div");
  meta.className = "meta";
  const pins = board.pin_count ?? 0;
  meta.textContent = `${board.privacy.toLowerCase()} · ${pins} pin${pins === 1 ? "" : "s"}`;
  li.append(name, meta);
  if (board.description) {
    const description = document.createElement("div");
    description.textContent = board.description;
    li.append(description);
  }
  return li;
}

async function loadBoards(more = false) {
  const params = new URLSearchParams({ page_size: "12" });
  if (more && bookmark) params.set("bookmark", bookmark);
  const page = await call("GET", `/boards?${params}`);
  if (!more) $("boards").replaceChildren();
  page.items.forEach((board) => $("boards").append(boardItem(board)));
  bookmark = page.bookmark;
  $("more").hidden = !bookmark;
  $("no-boards").hidden = $("boards").children.length > 0;
}

async function loadAccount() {
  const me = await call("GET", "/me");
  $("username").textContent = me.username;
  $("user-id").textContent = me.pinterest_user_id;
  $("scopes").textContent = me.scopes.join(", ");
  $("access-expiry").textContent = new Date(me.access_token_expires_at).toLocaleString();
  $("status").textContent = me.status.replace("_", " ");
  $("signed-out").hidden = true;
  $("signed-in").hidden = false;
  return me;
}

async function start() {
  try {
    const me = await loadAccount();
    if (me.status === "reauthorization_required") {
      explain({ data: { error: "reauthorization_required", login_url: "/auth/login" } });
      return;
    }
    await loadBoards();
  } catch (error) {
    explain(error);
  }
}

function eventItem(event) {
  const li = document.createElement("li");
  const type = document.createElement("code");
  type.textContent = event.type;
  const who = event.connection.username || event.connection.id;
  li.append(type, ` ${who} (${event.connection.id}) at ${new Date(event.created_at).toLocaleTimeString()}`);
  return li;
}

// The demo's receiver exists in demo mode only; elsewhere the section stays hidden.
async function pollWebhooks() {
  try {
    const received = await call("GET", "/demo/webhook-events");
    $("webhooks").hidden = false;
    $("webhook-events").replaceChildren(...received.items.map(eventItem));
    $("no-webhook-events").hidden = received.items.length > 0;
  } catch (error) {
    if (error.status === 404) return;
  }
  setTimeout(pollWebhooks, 2000);
}

function busy(button, work) {
  return async (event) => {
    event.preventDefault();
    button.disabled = true;
    try { await work(event); } catch (error) { explain(error); } finally { button.disabled = false; }
  };
}

// --- The backend panel (demo mode only) -------------------------------------------
// The demo also plays the app's backend: /demo/backend/* run pinauth.client against
// pinauth with an API key and answer with every HTTP exchange they made.

function exchangeItem(exchange) {
  const li = document.createElement("li");
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  const status = document.createElement("span");
  status.className = exchange.status < 400 ? "status-ok" : "status-error";
  status.textContent = String(exchange.status);
  summary.append(`${exchange.method} ${exchange.url} → `, status);
  const request = document.createElement("pre");
  request.textContent = [
    `${exchange.method} ${exchange.url}`,
    ...Object.entries(exchange.request_headers).map(([k, v]) => `${k}: ${v}`),
    ...(exchange.request_body ? ["", exchange.request_body] : []),
  ].join("\n");
  const response = document.createElement("pre");
  response.textContent = [
    `HTTP ${exchange.status}`,
    ...Object.entries(exchange.response_headers).map(([k, v]) => `${k}: ${v}`),
    ...(exchange.response_body ? ["", exchange.response_body] : []),
  ].join("\n");
  details.append(summary, request, response);
  li.append(details);
  return li;
}

function showExchanges(exchanges) {
  for (const exchange of exchanges || []) $("backend-exchanges").prepend(exchangeItem(exchange));
}

// One step of the backend: its exchanges are shown whether it worked or not.
async function backendStep(method, path, body) {
  try {
    const data = await call(method, path, body);
    showExchanges(data.exchanges);
    return data;
  } catch (error) {
    showExchanges(error.data && error.data.exchanges);
    throw error;
  }
}

function connectionItem(connection, checked) {
  const li = document.createElement("li");
  const label = document.createElement("label");
  const radio = document.createElement("input");
  radio.type = "radio";
  radio.name = "connection";
  radio.value = connection.id;
  radio.checked = checked;
  const text = document.createElement("span");
  text.textContent = `${connection.username} · ${connection.status.replace("_", " ")} · ${connection.id}`;
  label.append(radio, text);
  li.append(label);
  return li;
}

const END_USER_KEY = "pinauth-demo-end-user";

function endUserId() {
  return $("backend-mint").elements.end_user_id.value.trim();
}

async function listConnections() {
  const params = new URLSearchParams({ end_user_id: endUserId() });
  const data = await backendStep("GET", `/demo/backend/connections?${params}`);
  const list = $("backend-connections");
  list.replaceChildren(...data.connections.map((c, i) => connectionItem(c, i === 0)));
  $("backend-no-connections").hidden = data.connections.length > 0;
}

async function startBackend() {
  try {
    await call("GET", "/demo/backend");
  } catch {
    return; // not in demo mode: no backend to play
  }
  $("backend").hidden = false;
  const mint = $("backend-mint");
  // The demo app's "logged-in user" lives in this browser's storage, as an app's session
  // would: never in a URL, which anyone can send to anyone.
  const field = mint.elements.end_user_id;
  field.value = localStorage.getItem(END_USER_KEY) || field.value;
  field.addEventListener("change", () => localStorage.setItem(END_USER_KEY, endUserId()));
  mint.addEventListener("submit", busy(mint.querySelector("button"), async () => {
    localStorage.setItem(END_USER_KEY, endUserId());
    const data = await backendStep("POST", "/demo/backend/connect-sessions",
                                   { end_user_id: endUserId() });
    // From our own backend, not from Pinterest; still, only ever a web address.
    const url = new URL(data.connect_session.connect_url, location.href);
    if (url.protocol !== "http:" && url.protocol !== "https:") throw new Error("bad connect_url");
    $("backend-connect-link").href = url.href;
    $("backend-connect-expiry").textContent =
      new Date(data.connect_session.expires_at).toLocaleTimeString();
    $("backend-connect").hidden = false;
  }));
  $("backend-list").addEventListener("click", busy($("backend-list"), listConnections));
  const pin = $("backend-pin");
  pin.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = event.submitter;
    const chosen = document.querySelector("#backend-connections input:checked");
    if (!chosen) {
      show("List the end user's connections and choose one first.");
      return;
    }
    button.disabled = true;
    try {
      const data = await backendStep("POST", "/demo/backend/pins", {
        connection_id: chosen.value,
        title: pin.elements.title.value,
        via: button.value,
      });
      const how = button.value === "proxy_token" ? "with a proxy token" : "through the server route";
      show(`Pin “${data.pin.title}” posted ${how} (pin ${data.pin.id}).`, "info");
    } catch (error) {
      explain(error);
    } finally {
      button.disabled = false;
    }
  });
  if (await confirmReturningConnect()) {
    try { await listConnections(); } catch (error) { explain(error); }
  }
}

// Back from a connect link with ?pinauth_connect_result=…: the connection counts once the
// app's backend confirms it for the user logged in to the app, never for whoever pressed
// "Connect". Here the logged-in user is the panel's end user; a link minted for another
// end user (sent to this browser by someone else) is refused with 403 and discarded.
async function confirmReturningConnect() {
  const url = new URL(location.href);
  const result = url.searchParams.get("pinauth_connect_result");
  if (result === null) return false;
  url.searchParams.delete("pinauth_connect_result");  // one-time: not again on reload
  history.replaceState(null, "", url.pathname + url.search + url.hash);
  try {
    const data = await backendStep("POST", "/demo/backend/confirm",
                                   { result, end_user_id: endUserId() });
    show(`Connected ${data.connection.username} for ${endUserId()} (${data.connection.id}).`, "info");
  } catch (error) {
    explain(error);
  }
  return true;
}

// A login that failed comes back as ?pinauth_error=<code>; the rest is the frontend's.
const LOGIN_ERRORS = {
  access_denied: "The Pinterest account owner did not grant access.",
  invalid_state: "This login could not be verified: it expired, was already used, or was started in another browser. Connect again.",
  upstream_error: "Pinterest could not complete the login; try again in a moment.",
  upstream_timeout: "Pinterest did not answer in time; try again in a moment.",
};

function reportFailedLogin() {
  const url = new URL(location.href);
  const code = url.searchParams.get("pinauth_error");
  if (code === null) return;
  show(`${LOGIN_ERRORS[code] || "The login did not complete."} (${code})`);
  url.searchParams.delete("pinauth_error");
  history.replaceState(null, "", url.pathname + url.search + url.hash);
}

document.addEventListener("DOMContentLoaded", () => {
  reportFailedLogin();
  $("connect").href = `${API}/auth/login?return_to=${encodeURIComponent(location.pathname)}`;
  $("refresh").addEventListener("click", busy($("refresh"), async () => {
    await call("POST", "/auth/refresh");
    await loadAccount();
    show("Tokens refreshed.", "info");
  }));
  $("logout").addEventListener("click", busy($("logout"), async () => {
    await call("POST", "/auth/logout");
    signedOut();
    show("Logged out. The connection is kept; connect again to continue.", "info");
  }));
  $("disconnect").addEventListener("click", busy($("disconnect"), async () => {
    await call("DELETE", "/auth/connection");
    signedOut();
    show("Disconnected: pinauth deleted this account's tokens.", "info");
  }));
  $("more").addEventListener("click", busy($("more"), () => loadBoards(true)));
  const form = $("create-board");
  form.addEventListener("submit", busy(form.querySelector("button"), async () => {
    const fields = Object.fromEntries(new FormData(form));
    const board = await call("POST", "/pinterest/boards", fields);
    $("boards").prepend(boardItem(board));
    $("no-boards").hidden = true;
    form.reset();
    show(`Board “${board.name}” created.`, "info");
  }));
  start();
  startBackend();
  pollWebhooks();
});
