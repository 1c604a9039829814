// The pairing page: type a number, connect, see the code and the QR, watch
// the outcome arrive through the event stream. No build step, no
// dependencies: everything here talks to this service's own API.
"use strict";

const T = JSON.parse(document.getElementById("i18n").textContent);
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "wa-pair-token";
const CANONICAL = /^[1-9][0-9]{7,14}$/;
const FINAL = ["linked", "failed", "expired", "cancelled"];

let token = sessionStorage.getItem(TOKEN_KEY) || "";
let phone = null;
let events = null;
let countdown = null;
let shownQr = null;
let checkTimer = null;

function authHeaders(json) {
  const headers = {};
  if (json) headers["content-type"] = "application/json";
  if (token) headers.authorization = "Bearer " + token;
  return headers;
}

// EventSource and <img> cannot send headers: the token goes in the query.
function withToken(path, extra) {
  const params = new URLSearchParams(extra || {});
  if (token) params.set("access_token", token);
  const query = params.toString();
  return query ? path + "?" + query : path;
}

async function api(method, path, body) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: authHeaders(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (e) {
    return { status: 0, body: null };
  }
  let json = null;
  try {
    json = await response.json();
  } catch (e) {
    json = null;
  }
  if (response.status === 401) $("token-box").hidden = false;
  return { status: response.status, body: json };
}

function showPhoneError(message, suggestion) {
  const error = $("phone-error");
  error.textContent = message || "";
  error.hidden = !message;
  $("phone").setAttribute("aria-invalid", message ? "true" : "false");
  $("suggestion").textContent = suggestion || "";
  $("suggestion-box").hidden = !suggestion;
}

// The same rules as the API, asked of the API (it knows the suggestion);
// the local pattern only spares a request for a number that is fine.
async function checkPhone() {
  const typed = $("phone").value.trim();
  if (!typed) {
    showPhoneError("", "");
    return null;
  }
  if (CANONICAL.test(typed)) {
    showPhoneError("", "");
    return typed;
  }
  const answer = await api("GET", "/validate-phone?" + new URLSearchParams({ phone: typed }));
  if (answer.status === 200 && answer.body) {
    showPhoneError("", "");
    return answer.body.phone;
  }
  const suggestion = answer.body && answer.body.suggestion;
  showPhoneError(T.invalid_phone, suggestion);
  return null;
}

function stopWatching() {
  if (events) events.close();
  events = null;
  if (countdown) clearInterval(countdown);
  countdown = null;
}

function watch() {
  stopWatching();
  events = new EventSource(withToken("/pair/" + phone + "/events"));
  events.addEventListener("state", (e) => render(JSON.parse(e.data)));
  // EventSource reconnects by itself; the first event after it is the
  // current state, so nothing is missed.
}

function tick(expiresAt) {
  const left = Math.max(0, Math.round((Date.parse(expiresAt) - Date.now()) / 1000));
  const minutes = Math.floor(left / 60);
  const seconds = String(left % 60).padStart(2, "0");
  $("countdown").textContent = minutes + ":" + seconds;
}

function showQr(state) {
  const img = $("qr");
  const live = state.qr && (!state.qr_expires_at || Date.parse(state.qr_expires_at) > Date.now());
  if (!live) {
    img.hidden = true;
    $("qr-wait").hidden = false;
    shownQr = null;
    return;
  }
  if (state.qr !== shownQr) {
    shownQr = state.qr;
    // A new URL per QR, so no cache can show the previous one.
    img.src = withToken("/pair/" + phone + "/qr.svg", { v: state.qr_expires_at || "" });
  }
  img.hidden = false;
  $("qr-wait").hidden = true;
}

function reasonText(state) {
  return (state.reason && T["reason_" + state.reason]) || "";
}

function render(state) {
  $("session").dataset.status = state.status;
  if (FINAL.includes(state.status)) {
    stopWatching();
    $("session").hidden = true;
    $("outcome").hidden = false;
    $("outcome").dataset.status = state.status;
    $("outcome-text").textContent = T["outcome_" + state.status];
    $("outcome-detail").textContent = state.status === "linked" ? "" : reasonText(state);
    $("connect").disabled = false;
    return;
  }
  $("outcome").hidden = true;
  $("session").hidden = false;
  const codeBox = $("code-box");
  if (state.code) {
    codeBox.hidden = false;
    $("code").textContent = state.code_display || state.code;
    if (countdown) clearInterval(countdown);
    tick(state.expires_at);
    countdown = setInterval(() => tick(state.expires_at), 1000);
  } else {
    codeBox.hidden = true;
  }
  let status = T.status_pending;
  if (state.status === "starting") status = state.retry_at ? T.status_retrying : T.status_starting;
  if (state.reason === "code_unavailable") status = T.reason_code_unavailable;
  else if (state.reason === "code_budget") status = T.reason_code_budget;
  else if (state.reason === "handed_over") status = T.reason_handed_over;
  // An account that links with its passkey: no code or QR code links it.
  const passkey = (state.reason || "").startsWith("passkey_");
  if (passkey) status = reasonText(state);
  $("status-text").textContent = status;
  $("ways").hidden = passkey;
  // The steps are about typing the code or scanning the QR code.
  $("steps").hidden = passkey;
  const confirming = state.reason === "passkey_confirmation" && !!state.verification_code;
  $("passkey-box").hidden = !confirming;
  $("verification-code").hidden = !confirming;
  $("verification-code").textContent = confirming ? state.verification_code : "";
  $("confirm-passkey").hidden = !confirming;
  if (!passkey) showQr(state);
}

async function confirmPasskey() {
  $("confirm-passkey").disabled = true;
  const answer = await api("POST", "/pair/" + phone + "/passkey/confirm");
  $("confirm-passkey").disabled = false;
  if (answer.body && answer.body.status) {
    render(answer.body);
  } else {
    $("status-text").textContent = errorText(answer);
  }
}

async function start(event) {
  event.preventDefault();
  const checked = await checkPhone();
  if (!checked) {
    if (!$("phone").value.trim()) showPhoneError(T.invalid_phone, "");
    return;
  }
  phone = checked;
  $("connect").disabled = true;
  $("outcome").hidden = true;
  $("session").hidden = false;
  $("status-text").textContent = T.status_starting;
  const answer = await api("POST", "/pair", { phone });
  if (answer.body && answer.body.status) {
    render(answer.body);
    if (!FINAL.includes(answer.body.status)) watch();
    return;
  }
  $("connect").disabled = false;
  $("session").hidden = true;
  if (answer.body && answer.body.error === "invalid_phone") {
    showPhoneError(T.invalid_phone, answer.body.suggestion);
  } else {
    showPhoneError(errorText(answer), "");
  }
}

function errorText(answer) {
  const code = answer.body && answer.body.error;
  return (code && T["error_" + code]) || T.error_generic;
}

async function refresh() {
  $("refresh").disabled = true;
  const answer = await api("POST", "/pair/" + phone + "/refresh");
  $("refresh").disabled = false;
  if (answer.body && answer.body.status) {
    render(answer.body);
  } else {
    $("status-text").textContent = errorText(answer);
  }
}

function again() {
  stopWatching();
  phone = null;
  shownQr = null;
  $("outcome").hidden = true;
  $("session").hidden = true;
  $("connect").disabled = false;
  $("phone").focus();
}

$("start").addEventListener("submit", start);
$("phone").addEventListener("input", () => {
  clearTimeout(checkTimer);
  checkTimer = setTimeout(checkPhone, 300);
});
$("use-suggestion").addEventListener("click", () => {
  $("phone").value = $("suggestion").textContent;
  showPhoneError("", "");
});
$("refresh").addEventListener("click", refresh);
$("confirm-passkey").addEventListener("click", confirmPasskey);
$("again").addEventListener("click", again);
$("save-token").addEventListener("click", () => {
  token = $("token").value.trim();
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-box").hidden = true;
});
