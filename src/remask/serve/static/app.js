// The remask page: a chat that streams every denoising step (remask_stream: "steps") and draws
// the answer from masks to text, each token shaded by the step that revealed it.
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];
let controller = null;

function colour(step, last) {
  const f = last > 0 ? Math.min(1, step / last) : 0;
  return `hsl(${Math.round(230 - 230 * f)}, 70%, 40%)`;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// tokens: per answer position its text, null while masked, "" after the end-of-text.
function drawStep(div, tokens, revealSteps) {
  const last = Math.max(1, ...revealSteps);
  div.replaceChildren();
  tokens.forEach((text, i) => {
    if (text === "") return;
    const span = document.createElement("span");
    if (text === null) {
      span.className = "token masked";
      span.textContent = "░";
    } else {
      span.className = "token";
      span.textContent = text;
      span.style.color = colour(revealSteps[i], last);
      span.title = `revealed at step ${revealSteps[i] + 1}`;
    }
    div.appendChild(span);
  });
}

function settings() {
  const body = {
    max_tokens: Number($("max_tokens").value),
    temperature: Number($("temperature").value),
    remasking: $("remasking").value,
    cache: $("cache").value,
    parallel: $("parallel").value,
    threshold: Number($("threshold").value),
  };
  const block = Number($("block_length").value);
  if (block > 0) body.block_length = Math.min(block, body.max_tokens);
  if ($("steps").value) body.steps = Number($("steps").value);
  return body;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.dataset.state = "running";
  $("send").disabled = true;
  $("stop").disabled = false;
  $("status").textContent = "denoising…";
  controller = new AbortController();
  const headers = { "Content-Type": "application/json" };
  if ($("api_key").value) headers.Authorization = `Bearer ${$("api_key").value}`;
  let finalText = "";
  let steps = 0;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers, signal: controller.signal,
      body: JSON.stringify({ messages: history, stream: true, remask_stream: "steps", ...settings() }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${response.status}`);
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data:")) continue;
        const data = event.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.remask) {
          steps += 1;
          drawStep(answer, chunk.remask.tokens, chunk.remask.reveal_step);
          $("status").textContent = `step ${chunk.remask.step + 1}`;
        }
        for (const choice of chunk.choices || []) {
          if (choice.delta && choice.delta.content) finalText += choice.delta.content;
          if (choice.finish_reason) answer.dataset.finish = choice.finish_reason;
        }
      }
    }
    answer.dataset.state = "done";
    answer.dataset.text = finalText;
    $("status").textContent = `done in ${steps} steps (${answer.dataset.finish || "stop"})`;
    history.push({ role: "assistant", content: finalText });
  } catch (err) {
    answer.dataset.state = "error";
    if (err.name === "AbortError") {
      $("status").textContent = "stopped";
      history.pop();
    } else {
      answer.className = "message error";
      answer.textContent = String(err.message || err);
      $("status").textContent = "";
      history.pop();
    }
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || controller) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("ask").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("reset").addEventListener("click", () => {
  history.length = 0;
  $("conversation").replaceChildren();
  $("status").textContent = "";
});
fetch("/health").then((r) => r.json()).then((h) => { $("model").textContent = h.model; }).catch(() => {});
