// The ftvm cluster dashboard: polls the agent's /v1 API once a second and draws hosts, VMs
// with their replicas (role, epoch, lag) and the event timeline. API text goes into the DOM
// as text only (textContent), never as markup. Shapes: notes/CLUSTER-API.md.
//
// The token: taken from the address's #token=... (then removed from it), kept in this tab's
// sessionStorage, sent as "Authorization: Bearer"; a 401 asks for it again.
//
// The console pane: a WebSocket on /v1/vms/NAME/console (a browser cannot set Authorization on
// a WebSocket, so the token goes as ?access_token=); what the guest prints is shown as text,
// each line typed is sent; a closed socket (the primary moved) attaches again every second.
"use strict";

const POLL_MS = 1000;
const MAX_EVENTS = 500; // the timeline keeps the newest this many
const TOKEN_KEY = "ftvm-token";
const CONSOLE_MAX_CHARS = 64 * 1024; // the pane keeps the newest this many characters
const CONSOLE_RETRY_MS = 1000;

// What the page knows; window.ftvmDashboard lets a test (or a curious user) look at it.
const state = {
  polls: 0, // completed polls that reached the API
  lastSeq: 0, // the newest event seen
  events: [], // oldest first
  error: null, // why the last poll failed, or null
  updatedAt: null,
  // The console pane: which VM, its socket's state, how often it opened, characters received.
  console: { vm: null, state: "closed", opened: 0, received: 0 },
};
window.ftvmDashboard = state;

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

// ---- the token -------------------------------------------------------------------------

function takeTokenFromAddress() {
  const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (!match) return;
  try {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
  } catch (e) {
    return; // a malformed escape: ask with the form instead
  } finally {
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

function askForToken(reason) {
  document.body.dataset.state = "login";
  $("login").hidden = false;
  $("content").hidden = true;
  $("forget").hidden = true;
  if (reason) $("login-reason").textContent = reason;
  setStatus(reason || "no token", "bad");
  $("token").focus();
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const value = $("token").value.trim();
  if (!value) return;
  sessionStorage.setItem(TOKEN_KEY, value);
  $("token").value = "";
  $("login").hidden = true;
  schedule(0);
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  askForToken("Token forgotten. Paste it again to continue.");
});

// ---- polling ---------------------------------------------------------------------------

class Unauthorized extends Error {}

async function getJson(path) {
  const response = await fetch(path, {
    headers: { Authorization: "Bearer " + token(), Accept: "application/json" },
    cache: "no-store",
  });
  if (response.status === 401) throw new Unauthorized();
  let body = null;
  try {
    body = await response.json();
  } catch (e) {
    throw new Error(`${path}: ${response.status}, not JSON`);
  }
  if (!response.ok) throw new Error(`${path}: ${response.status} ${(body && body.error) || ""}`.trim());
  return body;
}

let timer = null;
function schedule(delayMs) {
  clearTimeout(timer);
  timer = setTimeout(poll, delayMs);
}

async function poll() {
  if (!token()) {
    askForToken("This agent's API needs its token (the agent's --token-file).");
    return;
  }
  let again = POLL_MS;
  try {
    const results = await Promise.allSettled([
      getJson("/v1/hosts"),
      getJson("/v1/vms"),
      getJson("/v1/events?since=" + state.lastSeq),
    ]);
    // A refused token first, else the first failure in this order: the same every time.
    const failures = results.filter((r) => r.status === "rejected").map((r) => r.reason);
    if (failures.length) throw failures.find((f) => f instanceof Unauthorized) || failures[0];
    const [hosts, vms, events] = results.map((r) => r.value);
    const full = takeEvents(events);
    state.polls += 1;
    state.error = null;
    state.updatedAt = new Date();
    show(hosts.hosts || [], vms.vms || []);
    if (full) again = 0; // more events are waiting
  } catch (e) {
    if (e instanceof Unauthorized) {
      sessionStorage.removeItem(TOKEN_KEY);
      askForToken("The agent refused the token (401). Paste the right one.");
      return;
    }
    state.error = String(e.message || e);
    document.body.dataset.state = "unreachable";
    setStatus("cannot reach the API: " + state.error + " — showing what was seen last", "bad");
  }
  schedule(again);
}

// Append the new events; true when the answer was full (more to fetch at once).
function takeEvents(answer) {
  const fresh = (answer.events || []).filter((e) => typeof e.seq === "number" && e.seq > state.lastSeq);
  if (typeof answer.last_seq === "number" && answer.last_seq < state.lastSeq) {
    // The store's timeline restarted (a new store): start over.
    state.events = [];
    state.lastSeq = 0;
    return true;
  }
  for (const event of fresh) {
    state.events.push(event);
    state.lastSeq = Math.max(state.lastSeq, event.seq);
  }
  if (state.events.length > MAX_EVENTS) state.events.splice(0, state.events.length - MAX_EVENTS);
  return (answer.events || []).length >= 500;
}

// ---- drawing ---------------------------------------------------------------------------

function setStatus(text, tone) {
  const status = $("status");
  status.textContent = text;
  status.className = tone || "";
}

function show(hosts, vms) {
  document.body.dataset.state = "live";
  $("login").hidden = true;
  $("content").hidden = false;
  $("forget").hidden = false;
  showHosts(hosts);
  showVms(vms);
  showTimeline();
  const alive = hosts.filter((h) => h.alive).length;
  const protectedVms = vms.filter((v) => v.state === "protected").length;
  $("summary").textContent = `${alive}/${hosts.length} hosts alive · ${protectedVms}/${vms.length} VMs protected`;
  setStatus("live · updated " + clock(state.updatedAt), "good");
}

function showHosts(hosts) {
  $("hosts-count").textContent = `(${hosts.length})`;
  const rows = hosts.map((host) => {
    const tr = el("tr");
    tr.dataset.host = host.name;
    tr.dataset.alive = String(Boolean(host.alive));
    tr.dataset.state = host.state || "";
    tr.append(
      el("td", host.name, "name"),
      el("td", host.alive ? host.state : "down", "badge host-" + (host.alive ? host.state : "down")),
      el("td", heartbeat(host)),
      el("td", labels(host.labels)),
      el("td", host.memory_mib_free == null ? "–" : host.memory_mib_free + " MiB"),
      replicasCell(host),
    );
    return tr;
  });
  $("hosts").tBodies[0].replaceChildren(...rows);
}

// A host that is down still has the replicas of its last report: shown as such, not as running.
function replicasCell(host) {
  const text = (host.replicas || []).join(", ");
  if (!text) return el("td", "–");
  return host.alive ? el("td", text) : el("td", "last reported: " + text, "dim stale");
}

function heartbeat(host) {
  const ago = host.last_heartbeat_ms_ago;
  const text = ago == null ? "never" : ago < 1000 ? `${ago} ms ago` : `${(ago / 1000).toFixed(1)} s ago`;
  return host.missed_heartbeats ? `${text} (${host.missed_heartbeats} missed)` : text;
}

function labels(map) {
  const entries = Object.entries(map || {});
  return entries.length ? entries.map(([k, v]) => `${k}=${v}`).join(" ") : "–";
}

// One row per replica; the VM's own cells span its replicas' rows.
function showVms(vms) {
  $("vms-count").textContent = `(${vms.length})`;
  const rows = [];
  for (const vm of vms) {
    const replicas = vm.replicas && vm.replicas.length ? vm.replicas : [null];
    const primary = replicas.find((r) => r && r.role === "primary");
    replicas.forEach((replica, i) => {
      const tr = el("tr", null, i === 0 ? "vm-first" : "");
      tr.dataset.vm = vm.name;
      if (i === 0) {
        const spec = vm.spec || {};
        const cells = [
          el("td", vm.name, "name"),
          el("td", vm.state, "badge vm-" + vm.state),
          el("td", `${spec.protection || "?"} ×${spec.replicas ?? "?"}`),
          el("td", vm.generation ?? "–"),
          el("td", vm.failovers ?? 0),
          consoleCell(vm),
        ];
        for (const cell of cells) {
          cell.rowSpan = replicas.length;
          tr.append(cell);
        }
      }
      tr.append(...replicaCells(replica, primary));
      if (replica) {
        tr.dataset.host = replica.host;
        tr.dataset.role = replica.role;
      }
      rows.push(tr);
    });
  }
  $("vms").tBodies[0].replaceChildren(...rows);
}

function consoleCell(vm) {
  const cell = el("td");
  const button = el("button", state.console.vm === vm.name ? "attached" : "console", "console-open");
  button.type = "button";
  button.dataset.console = vm.name;
  cell.append(button);
  return cell;
}

function replicaCells(replica, primary) {
  if (!replica) return [el("td", "no replica", "dim"), el("td"), el("td"), el("td"), el("td")];
  const lagCell = el("td", lag(replica, primary), "lag");
  if (replica.role === "primary" && replica.protected === false) lagCell.classList.add("warn");
  return [
    el("td", replica.host, "name"),
    el("td", replica.role, "badge role-" + replica.role),
    el("td", replica.epoch ?? "–"),
    lagCell,
    el("td", replica.status_age_ms == null ? "–" : `${replica.status_age_ms} ms`),
  ];
}

// A primary's lag is its epochs not yet acknowledged; a backup's is how far its applied
// epoch trails its primary's.
function lag(replica, primary) {
  if (replica.role === "primary") {
    const unprotected = replica.protected === false ? " · unprotected" : "";
    if (replica.lag_epochs == null) return "–" + unprotected;
    return `${replica.lag_epochs} epoch${replica.lag_epochs === 1 ? "" : "s"}${unprotected}`;
  }
  if (replica.role === "backup" && primary && typeof primary.epoch === "number" && typeof replica.epoch === "number") {
    return `${Math.max(0, primary.epoch - replica.epoch)} behind`;
  }
  return "–";
}

function showTimeline() {
  $("timeline-count").textContent = `(${state.events.length})`;
  const items = state.events
    .slice()
    .reverse()
    .map((event) => {
      const kind = String(event.kind ?? "unknown");
      const li = el("li", null, "event kind-" + kind);
      li.dataset.seq = String(event.seq);
      li.dataset.kind = kind;
      if (event.vm) li.dataset.vm = event.vm;
      if (event.host) li.dataset.host = event.host;
      li.append(
        el("time", eventTime(event.time)),
        el("span", kind.replaceAll("_", " "), "kind"),
        el("span", [event.vm, event.host].filter(Boolean).join(" @ "), "where"),
        el("span", event.message || "", "message"),
      );
      return li;
    });
  $("timeline").replaceChildren(...items);
}

function eventTime(text) {
  const date = new Date(text);
  return isNaN(date) ? String(text ?? "") : clock(date);
}

// HH:MM:SS.mmm in UTC, as the API's times are.
function clock(date) {
  return date.toISOString().slice(11, 23) + "Z";
}

// ---- the console -----------------------------------------------------------------------

let consoleSocket = null;
let consoleTimer = null;
let consoleText = "";

function consoleUrl(vm) {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const name = encodeURIComponent(vm);
  return `${scheme}//${location.host}/v1/vms/${name}/console?access_token=${encodeURIComponent(token() || "")}`;
}

function setConsoleState(value) {
  state.console.state = value;
  $("console-section").dataset.state = value;
  $("console-state").textContent = `(${value})`;
}

function openConsole(vm) {
  closeConsole();
  state.console.vm = vm;
  consoleText = "";
  $("console-output").textContent = "";
  $("console-vm").textContent = vm;
  $("console-section").dataset.vm = vm;
  $("console-section").hidden = false;
  connectConsole();
  $("console-input").focus();
}

function closeConsole() {
  clearTimeout(consoleTimer);
  const socket = consoleSocket;
  consoleSocket = null;
  if (socket) socket.close();
  state.console.vm = null;
  setConsoleState("closed");
  $("console-section").hidden = true;
}

function connectConsole() {
  const vm = state.console.vm;
  if (!vm || !token()) return;
  const socket = new WebSocket(consoleUrl(vm));
  socket.binaryType = "arraybuffer";
  const decoder = new TextDecoder();
  consoleSocket = socket;
  setConsoleState("connecting");
  socket.onopen = () => {
    if (consoleSocket !== socket) return;
    state.console.opened += 1;
    setConsoleState("open");
  };
  socket.onmessage = (event) => {
    if (consoleSocket !== socket) return;
    const text = typeof event.data === "string" ? event.data : decoder.decode(new Uint8Array(event.data), { stream: true });
    state.console.received += text.length;
    appendConsole(text);
  };
  socket.onclose = () => {
    if (consoleSocket !== socket) return; // closed by the user, or replaced
    consoleSocket = null;
    setConsoleState("reconnecting");
    consoleTimer = setTimeout(connectConsole, CONSOLE_RETRY_MS);
  };
}

// Terminal control sequences and carriage returns are dropped: the pane shows plain text.
function appendConsole(text) {
  consoleText += text.replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, "").replace(/\x1b[()][A-Za-z0-9]/g, "").replace(/\r/g, "");
  if (consoleText.length > CONSOLE_MAX_CHARS) consoleText = consoleText.slice(-CONSOLE_MAX_CHARS);
  const output = $("console-output");
  output.textContent = consoleText;
  output.scrollTop = output.scrollHeight;
}

$("vms").addEventListener("click", (event) => {
  const button = event.target.closest("button[data-console]");
  if (button) openConsole(button.dataset.console);
});

$("console-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("console-input");
  if (!consoleSocket || consoleSocket.readyState !== WebSocket.OPEN) return;
  consoleSocket.send(input.value + "\n");
  input.value = "";
});

$("console-close").addEventListener("click", closeConsole);

// A new #token=... pasted into this tab's address bar replaces the one kept.
window.addEventListener("hashchange", () => {
  if (!/(?:^#|&)token=/.test(location.hash)) return;
  takeTokenFromAddress();
  $("login").hidden = true;
  schedule(0);
});

takeTokenFromAddress();
schedule(0);
