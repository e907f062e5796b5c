"""The demo backend's page: speak through the proxy in a browser and see miss, then hit.

A browser sends no identity, and the proxy caches nothing for nobody. The page therefore sends
`X-Forwarded-Email: demo@example.com` itself, as the Databricks Apps gateway would for a signed-in
user: a demo identity, for the demo only, said on the page. The proxy believes it only because
the browser reaches it from loopback, which `identity.trusted_proxies` trusts by default; from any
other address the page shows `detail=untrusted-peer`.
"""

from __future__ import annotations

from typing import Final

DEMO_USER: Final = "demo@example.com"

INDEX_HTML: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>TTS demo backend</title>
<style>
  body { font-family: system-ui, sans-serif; max-width: 44rem; margin: 2rem auto; padding: 0 1rem; }
  textarea, input, select { font: inherit; width: 100%; box-sizing: border-box; }
  textarea, input, select { margin: .2rem 0 .8rem; }
  label.inline input { width: auto; }
  pre { background: #f4f4f4; padding: .6rem; white-space: pre-wrap; }
  .demo-identity { border: 2px dashed #b45309; background: #fffbeb; padding: .4rem .8rem; }
  #outcome { font-size: 1.4rem; font-weight: bold; }
</style>
</head>
<body>
<h1>TTS demo backend</h1>
<p>This is the <strong>offline demo</strong> of the legacy chat backend that the TTS cache proxy
sits in front of. It answers <code>POST /api/tts/speak</code> with the legacy contract, but makes
its audio locally (espeak-ng when installed, otherwise a synthesized tone per word) as
<code>audio/wav</code>. It never caches: open this page through the proxy and press
<strong>Speak</strong> twice: the first answer is a <code>miss</code>, the second a
<code>hit</code>.</p>
<p class="demo-identity" id="demo-identity"><strong>Demo identity.</strong> This page sends
<code>X-Forwarded-Email: __DEMO_USER__</code> with each call, as the Databricks Apps gateway does
for a signed-in user. Only the demo does this: a real client never names its user, and the proxy
believes this header only because your browser connects from loopback
(<code>identity.trusted_proxies</code>).</p>
<form id="speak">
  <label>Text <textarea name="text" rows="3">Hello from the demo backend.</textarea></label>
  <label>Voice
    <select name="voice">
      <option>af_nicole</option><option>af_bella</option><option>am_adam</option>
      <option>bf_emma</option><option>bm_george</option><option>aura-2-thalia-en</option>
    </select>
  </label>
  <label class="inline"><input type="checkbox" name="ids" id="ids"> send a message id and thread id
    (the planned client; unticked, the call is keyed by its text, as today's client's is)</label>
  <label>Message id <input name="message_id" value="m-1"></label>
  <label>Thread id <input name="thread_id" value="t-1"></label>
  <label>save_to_volume
    <select name="save_to_volume" id="save">
      <option value="">not sent (today's client; the demo saves such calls)</option>
      <option value="true">true</option>
      <option value="false">false (never cached)</option>
    </select>
  </label>
  <p><button type="submit" id="speak-button">Speak</button></p>
</form>
<p id="outcome"></p>
<audio id="player" controls></audio>
<pre id="result">Headers appear here.</pre>
<p><button id="events">Listen to /api/events</button></p>
<pre id="ticks"></pre>
<script>
const form = document.getElementById("speak");
form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const data = new FormData(form);
  const body = {text: data.get("text"), voice: data.get("voice"), provider: "replicate"};
  if (data.get("ids") === "on") {
    body.message_id = data.get("message_id");
    body.thread_id = data.get("thread_id");
  }
  if (data.get("save_to_volume") !== "") {
    body.save_to_volume = data.get("save_to_volume") === "true";
  }
  const started = performance.now();
  const response = await fetch("/api/tts/speak", {
    method: "POST",
    // The demo identity (see the dashed box above): what the gateway would add.
    headers: {"Content-Type": "application/json", "X-Forwarded-Email": "__DEMO_USER__"},
    body: JSON.stringify(body),
  });
  const audio = await response.blob();
  const elapsed = (performance.now() - started).toFixed(0);
  const lines = [`${response.status} in ${elapsed} ms, ${audio.size} bytes`];
  for (const name of ["content-type", "x-tts-provider", "x-tts-cache", "x-tts-cache-tier",
                      "cache-status", "content-location"]) {
    lines.push(`${name}: ${response.headers.get(name)}`);
  }
  document.getElementById("result").textContent = lines.join("\\n");
  document.getElementById("outcome").textContent = response.headers.get("x-tts-cache") || "";
  if (response.ok) {
    const player = document.getElementById("player");
    player.src = URL.createObjectURL(audio);
    player.play().catch(() => {});
  }
});
document.getElementById("events").addEventListener("click", () => {
  const ticks = document.getElementById("ticks");
  ticks.textContent = "";
  const source = new EventSource("/api/events?count=5&interval=1");
  source.onmessage = (event) => { ticks.textContent += event.data + "\\n"; };
  source.onerror = () => source.close();
});
</script>
</body>
</html>
""".replace("__DEMO_USER__", DEMO_USER)
