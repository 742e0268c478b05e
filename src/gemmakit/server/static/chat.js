// The gemmakit chat page: talks to this server's /v1/chat/completions with streaming, keeps conversations and
// settings in localStorage, renders answers as sanitized Markdown. No build step, no network but this server.
"use strict";

const STORE_CONVERSATIONS = "gemmakit.conversations";
const STORE_SETTINGS = "gemmakit.settings";
const SETTING_FIELDS = {  // element id -> [settings key, number parser or null for text]
  "api-key": ["apiKey", null],
  "system-prompt": ["system", null],
  "temperature": ["temperature", parseFloat],
  "top-p": ["top_p", parseFloat],
  "top-k": ["top_k", (v) => parseInt(v, 10)],
  "max-tokens": ["max_tokens", (v) => parseInt(v, 10)],
  "seed": ["seed", (v) => parseInt(v, 10)],
};

const $ = (id) => document.getElementById(id);
const state = { conversations: [], currentId: null, settings: {}, modelId: null, controller: null };

// -- storage -------------------------------------------------------------------------------------------------

function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch (e) {
    return fallback;  // a damaged entry is replaced at the next save rather than breaking the page
  }
}

function save() {
  localStorage.setItem(STORE_CONVERSATIONS, JSON.stringify(state.conversations));
  localStorage.setItem(STORE_SETTINGS, JSON.stringify(state.settings));
}

function current() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function newConversation() {
  const conversation = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 6), title: "New chat",
                         messages: [], updated: Date.now() };
  state.conversations.unshift(conversation);
  state.currentId = conversation.id;
  save();
  return conversation;
}

// -- rendering -----------------------------------------------------------------------------------------------

function markdown(text) {
  // DOMPurify strips anything that could run: the model's output is never trusted as HTML.
  return window.DOMPurify.sanitize(window.marked.parse(text || "", { gfm: true, breaks: true }));
}

function messageElement(message) {
  const el = document.createElement("article");
  el.className = "message " + message.role;
  el.setAttribute("aria-label", message.role === "user" ? "You" : "Assistant");
  if (message.reasoning) {
    const details = document.createElement("details");
    details.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const body = document.createElement("div");
    body.innerHTML = markdown(message.reasoning);
    details.append(summary, body);
    el.append(details);
  }
  const content = document.createElement("div");
  content.className = "content";
  if (message.role === "user") content.textContent = message.content;
  else content.innerHTML = markdown(message.content);
  el.append(content);
  for (const call of message.tool_calls || []) {
    const block = document.createElement("div");
    block.className = "tool-call";
    block.textContent = `tool call: ${call.function.name}(${call.function.arguments})`;
    el.append(block);
  }
  if (message.stats) {
    const stats = document.createElement("div");
    stats.className = "stats muted";
    stats.textContent = message.stats;
    el.append(stats);
  }
  return el;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren(...(current() ? current().messages.map(messageElement) : []));
  box.scrollTop = box.scrollHeight;
}

function renderConversations() {
  const list = $("conversations");
  list.replaceChildren(...state.conversations.map((c) => {
    const item = document.createElement("li");
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open" + (c.id === state.currentId ? " current" : "");
    open.textContent = c.title;
    open.addEventListener("click", () => {
      state.currentId = c.id;
      $("sidebar").classList.remove("open");  // on a phone the list covers the chat
      renderAll();
      $("input").focus();
    });
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete";
    remove.textContent = "\u00d7";
    remove.setAttribute("aria-label", `Delete ${c.title}`);
    remove.addEventListener("click", () => deleteConversation(c.id));
    item.append(open, remove);
    return item;
  }));
}

function renderAll() {
  renderConversations();
  renderMessages();
}

function deleteConversation(id) {
  state.conversations = state.conversations.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = state.conversations.length ? state.conversations[0].id : null;
  save();
  renderAll();
}

// -- settings ------------------------------------------------------------------------------------------------

function readSettings() {
  for (const [id, [key, parse]] of Object.entries(SETTING_FIELDS)) {
    const raw = $(id).value;
    if (parse === null) state.settings[key] = raw;
    else if (raw.trim() === "" || Number.isNaN(parse(raw))) delete state.settings[key];
    else state.settings[key] = parse(raw);
  }
  save();
}

function showSettings() {
  for (const [id, [key]] of Object.entries(SETTING_FIELDS)) {
    const value = state.settings[key];
    $(id).value = value === undefined || value === null ? "" : value;
  }
}

function openSettings(open = true) {
  $("settings").hidden = !open;
  $("toggle-settings").setAttribute("aria-expanded", String(open));
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.settings.apiKey) h.Authorization = "Bearer " + state.settings.apiKey;
  return h;
}

function requestBody(conversation) {
  const messages = [];
  if (state.settings.system) messages.push({ role: "system", content: state.settings.system });
  for (const m of conversation.messages) {
    if (m.role === "user" || (m.role === "assistant" && m.content)) messages.push({ role: m.role, content: m.content });
  }
  const body = { model: state.modelId || "default", messages, stream: true, stream_options: { include_usage: true } };
  for (const key of ["temperature", "top_p", "top_k", "max_tokens", "seed"]) {
    if (state.settings[key] !== undefined) body[key] = state.settings[key];
  }
  return body;
}

// -- streaming -----------------------------------------------------------------------------------------------

async function* serverEvents(response) {
  // Server-sent events: "data: {...}" lines separated by blank lines, ending with "data: [DONE]".
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function applyDelta(message, delta) {
  if (delta.content) message.content += delta.content;
  if (delta.reasoning_content) message.reasoning = (message.reasoning || "") + delta.reasoning_content;
  for (const call of delta.tool_calls || []) {
    message.tool_calls = message.tool_calls || [];
    const slot = call.index ?? message.tool_calls.length;
    const existing = message.tool_calls[slot];
    if (!existing) {
      message.tool_calls[slot] = { id: call.id, type: "function",
                                   function: { name: call.function?.name || "", arguments: call.function?.arguments || "" } };
    } else {
      existing.function.arguments += call.function?.arguments || "";
    }
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || response.statusText;
  } catch (e) {
    return response.statusText;
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function streamAnswer(conversation, answer) {
  const started = performance.now();
  let first = null;
  let tokens = 0;
  let finish = null;
  const response = await fetch("v1/chat/completions", { method: "POST", headers: headers(),
    body: JSON.stringify(requestBody(conversation)), signal: state.controller.signal });
  if (!response.ok) {
    if (response.status === 401) { $("api-key-row").hidden = false; openSettings(); }
    throw new Error(`${response.status}: ${await errorText(response)}`);
  }
  for await (const event of serverEvents(response)) {
    if (event.error) throw new Error(event.error.message);
    if (event.usage) tokens = event.usage.completion_tokens;
    const choice = event.choices && event.choices[0];
    if (!choice) continue;
    if (first === null && (choice.delta.content || choice.delta.reasoning_content)) first = performance.now();
    applyDelta(answer, choice.delta);
    finish = choice.finish_reason || finish;
    renderMessages();
  }
  const seconds = (performance.now() - (first ?? started)) / 1000;
  const rate = tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : 0;
  answer.stats = `${tokens} tokens, ${rate.toFixed(1)} tok/s` + (finish === "length" ? " (cut at the token limit)" : "");
}

async function send(text) {
  readSettings();
  const conversation = current() || newConversation();
  conversation.messages.push({ role: "user", content: text });
  if (conversation.title === "New chat") conversation.title = text.slice(0, 40);
  const answer = { role: "assistant", content: "" };
  conversation.messages.push(answer);
  conversation.updated = Date.now();
  save();
  renderAll();
  state.controller = new AbortController();
  setBusy(true);
  $("status").textContent = "";
  try {
    await streamAnswer(conversation, answer);
  } catch (error) {
    if (error.name === "AbortError") answer.stats = "stopped";
    else $("status").textContent = "Error: " + error.message;
  } finally {
    state.controller = null;
    setBusy(false);
    save();
    renderAll();
  }
}

// -- wiring --------------------------------------------------------------------------------------------------

async function discoverServer() {
  try {
    const health = await (await fetch("health")).json();
    if (health.auth) {
      $("api-key-row").hidden = false;
      if (!state.settings.apiKey) openSettings();  // nothing works without the key: ask for it up front
    }
    if (health.kernels && !health.kernels.available) {
      $("status").textContent = "Note: this server runs without its compiled kernels (much slower).";
    }
    const models = await fetch("v1/models", { headers: headers() });
    if (models.ok) {
      state.modelId = (await models.json()).data[0].id;
      $("model-name").textContent = state.modelId;
    }
  } catch (e) {
    $("status").textContent = "Cannot reach the server.";
  }
}

function wire() {
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => { newConversation(); renderAll(); $("input").focus(); });
  $("toggle-settings").addEventListener("click", () => openSettings($("settings").hidden));
  $("toggle-sidebar").addEventListener("click", () => {
    const open = !$("sidebar").classList.contains("open");
    $("sidebar").classList.toggle("open", open);
    $("toggle-sidebar").setAttribute("aria-expanded", String(open));
  });
  for (const id of Object.keys(SETTING_FIELDS)) $(id).addEventListener("change", readSettings);
  $("api-key").addEventListener("change", discoverServer);  // the model list needs the key
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) state.controller.abort();
  });
}

function start() {
  state.conversations = load(STORE_CONVERSATIONS, []);
  state.settings = load(STORE_SETTINGS, {});
  state.currentId = state.conversations.length ? state.conversations[0].id : null;
  showSettings();
  wire();
  renderAll();
  discoverServer();
}

document.addEventListener("DOMContentLoaded", start);
