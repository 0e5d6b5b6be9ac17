// The chat page: OpenAI's /v1/chat/completions, streamed, from this server. No build step, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
const history = [];           // {role, content} of this conversation
let controller = null;        // the AbortController of the answer in progress
let conversation = 0;         // bumped by New chat: an answer of an earlier conversation is not kept

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value || localStorage.getItem("pocketlm-api-key");
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModels() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    $("key-label").hidden = false;
    $("status").textContent = "This server needs an API key: enter it above.";
    return;
  }
  const models = (await r.json()).data || [];
  const select = $("model");
  const previous = select.value;
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (models.some((m) => m.id === previous)) select.value = previous;
  $("status").textContent = models.length ? "" : "No model is served.";
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function ask(question) {
  const mine = conversation;
  history.push({ role: "user", content: question });
  bubble("user", question);
  const out = bubble("assistant", "");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = { model: $("model").value, messages, stream: true, stream_options: { include_usage: true } };
  const temperature = $("temperature").value;
  if (temperature !== "") body.temperature = Number(temperature);
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let tFirst = null, tokens = null, text = "", reason = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                                    signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || r.statusText);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        for (const choice of event.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            if (tFirst === null) tFirst = performance.now();
            text += piece;
            out.textContent = text;
            out.scrollIntoView({ block: "end" });
          }
          if (choice.finish_reason) reason = choice.finish_reason;
        }
        if (event.usage) tokens = event.usage.completion_tokens;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      out.className = "msg error";
      out.textContent = (text ? text + "\n" : "") + "Error: " + e.message;
      if (mine === conversation) history.pop();
      setBusy(false);
      return;
    }
    reason = "stopped";
  } finally {
    controller = null;
    setBusy(false);
  }
  if (mine !== conversation) return;  // New chat was pressed meanwhile
  history.push({ role: "assistant", content: text });
  const stats = document.createElement("span");
  stats.className = "stats";
  const t1 = performance.now();
  const parts = [];
  if (tFirst !== null) parts.push(`first token ${((tFirst - t0) / 1000).toFixed(2)} s`);
  if (tokens !== null && tFirst !== null && tokens > 1 && t1 > tFirst) {
    parts.push(`${tokens} tokens, ${((tokens - 1) / ((t1 - tFirst) / 1000)).toFixed(1)} tok/s`);
  }
  if (reason) parts.push(reason);
  stats.textContent = parts.join(" · ");
  stats.dataset.reason = reason || "";
  out.appendChild(stats);
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const question = $("prompt").value.trim();
  if (!question || controller) return;
  $("prompt").value = "";
  ask(question);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  conversation += 1;
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
});
$("api-key").addEventListener("change", () => {
  localStorage.setItem("pocketlm-api-key", $("api-key").value);
  loadModels();
});
loadModels();
