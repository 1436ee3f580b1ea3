// The page: the key once per tab (sessionStorage), then the playground, and the console for
// admin keys (system_details says whether the key is one). `#playground` / `#console` in the
// address choose the section.

import { call, openapi, session } from "./api.js";
import { $, say } from "./dom.js";
import { Console } from "./console.js";
import { Playground } from "./playground.js";

let doc;
let playground;
let operator;
let admin = false;

async function start() {
  $("#login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("#key-input").value.trim();
    if (!key) return;
    session.key = key;
    $("#key-input").value = "";
    signIn();
  });
  $("#forget-key").addEventListener("click", () => {
    session.key = "";
    admin = false;
    operator?.show(false);
    playground?.clear(); // the results were that key's
    window.location.hash = "";
    showLogin();
  });
  window.addEventListener("hashchange", route);
  try {
    doc = await openapi();
  } catch (error) {
    say($("#login-error"), error.message, "error");
    return;
  }
  if (session.key) signIn();
  else showLogin();
}

function showLogin(message = "") {
  $("#login").hidden = false;
  $("#playground").hidden = true;
  $("#console").hidden = true;
  $("#session").hidden = true;
  $("#nav").hidden = true;
  say($("#login-error"), message, message ? "error" : "info");
  $("#key-input").focus();
}

async function signIn() {
  let details;
  try {
    details = await call("system_details");
  } catch (error) {
    session.key = "";
    showLogin(error.status === 401 ? "That key is not valid on this server." : error.message);
    return;
  }
  admin = Boolean(details.caller?.admin);
  $("#who").textContent = `key ${details.caller?.key_id ?? ""}${admin ? " (admin)" : ""}`;
  $("#nav-console").hidden = !admin;
  $("#login").hidden = true;
  $("#session").hidden = false;
  $("#nav").hidden = false;
  playground ??= new Playground($("#playground"), doc);
  if (admin) operator ??= new Console($("#console"), doc);
  try {
    await playground.refresh();
  } catch (error) {
    say($("#play-status"), error.message, "error");
  }
  route();
}

function route() {
  if (!session.key || !playground) return;
  const wanted = window.location.hash === "#console" && admin ? "console" : "playground";
  $("#playground").hidden = wanted !== "playground";
  $("#console").hidden = wanted !== "console";
  $("#nav-playground").setAttribute("aria-current", String(wanted === "playground"));
  $("#nav-console").setAttribute("aria-current", String(wanted === "console"));
  operator?.show(wanted === "console");
  document.title = `${wanted === "console" ? "Console" : "Playground"} — Stable Diffusion API`;
}

start();
