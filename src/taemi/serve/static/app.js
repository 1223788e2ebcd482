/* taemi serve page: send one clip to POST /v1/predict and show what comes back.
 *
 * The six intensities as labelled bars with their values as text, the transcript, which
 * modalities were used (or why one is missing), and the two attention timelines (audio,
 * face frames) under the player: x = time / media duration, a playhead that follows the
 * player, and a click (or arrow keys) on a timeline seeks the player there.
 *
 * Plain browser JavaScript: no build step, no framework, no request other than this
 * server's API. The file is played from the device (an object URL), never downloaded back.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "taemi.token";
  const MODALITIES = ["audio", "vision", "text"];
  const MODALITY_NAMES = { audio: "Audio (voice)", vision: "Face (video frames)", text: "Text (transcript)" };
  const AUDIO_EXTENSIONS = new Set(["mp3", "m4a", "wav", "ogg", "oga", "opus", "flac", "aac", "wma"]);
  const TICK_STEPS = [0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600];

  const $ = (id) => document.getElementById(id);
  const ui = {
    model: $("model"),
    form: $("upload-form"),
    dropzone: $("dropzone"),
    file: $("file"),
    tokenBox: $("token-box"),
    token: $("token"),
    status: $("status"),
    progress: $("progress"),
    cancel: $("cancel"),
    error: $("error"),
    results: $("results"),
    resultName: $("result-name"),
    playerBox: $("player-box"),
    playerNote: $("player-note"),
    axis: $("axis"),
    position: $("position"),
    bars: $("bars"),
    transcript: $("transcript"),
    modalities: $("modalities"),
    timings: $("timings"),
  };

  /** What the page shows now: the request in flight and the clip on screen. */
  const state = {
    xhr: null,
    ticker: 0,
    objectUrl: null,
    clip: null,
    player: null,
    playable: true,
    position: 0, // seconds; the playhead when the browser cannot play the file
    timelines: [], // {box, canvas, head, attention}
    frame: 0,
  };

  // ------------------------------------------------------------------ small helpers

  function make(tag, props, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  function seconds(value) {
    if (!Number.isFinite(value)) return "?";
    return value >= 10 ? value.toFixed(1) + " s" : value.toFixed(2) + " s";
  }

  function extension(name) {
    const dot = name.lastIndexOf(".");
    return dot < 0 ? "" : name.slice(dot + 1).toLowerCase();
  }

  function isAudioFile(file) {
    if (file.type) return file.type.startsWith("audio/");
    return AUDIO_EXTENSIONS.has(extension(file.name));
  }

  function authHeaders() {
    const token = ui.token.value.trim();
    return token ? { Authorization: "Bearer " + token } : {};
  }

  function setStatus(text, kind) {
    ui.status.textContent = text;
    ui.status.dataset.state = kind;
  }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.textContent = "";
    ui.error.hidden = true;
  }

  /** A readable sentence from an error response ({"error": {status, code, message}}). */
  function errorText(status, body, retryAfter) {
    let message = "";
    let code = "";
    try {
      const parsed = JSON.parse(body);
      if (parsed && parsed.error) {
        message = parsed.error.message || "";
        code = parsed.error.code || "";
      } else if (parsed && parsed.detail) {
        message = typeof parsed.detail === "string" ? parsed.detail : JSON.stringify(parsed.detail);
      }
    } catch (_) {
      message = (body || "").trim().slice(0, 300);
    }
    if (!message) message = "the server answered without a reason";
    let text = "Error " + status + (code ? " (" + code + ")" : "") + ": " + message;
    if (status === 503 && retryAfter) text += " Try again in " + retryAfter + " s.";
    if (status === 401) text += " Enter the access token below and choose the file again.";
    return text;
  }

  // ------------------------------------------------------------------ token and model line

  function restoreToken() {
    try {
      const saved = sessionStorage.getItem(TOKEN_KEY);
      if (saved) {
        ui.token.value = saved;
        ui.tokenBox.open = true;
      }
    } catch (_) {
      /* storage disabled: the field still works for this page */
    }
    ui.token.addEventListener("input", () => {
      try {
        if (ui.token.value) sessionStorage.setItem(TOKEN_KEY, ui.token.value);
        else sessionStorage.removeItem(TOKEN_KEY);
      } catch (_) {
        /* as above */
      }
    });
    ui.token.addEventListener("change", loadModel);
  }

  function loadModel() {
    fetch("/v1/model", { headers: authHeaders() })
      .then((response) =>
        response.text().then((body) => {
          if (!response.ok) {
            ui.model.textContent = "Model: unknown. " + errorText(response.status, body);
            return;
          }
          const info = JSON.parse(body);
          const emotions = Array.isArray(info.emotions) ? info.emotions.join(", ") : "";
          ui.model.textContent = "Model: " + (info.run || "?") + (emotions ? " \u00b7 " + emotions : "");
          ui.model.dataset.run = info.run || "";
        })
      )
      .catch(() => {
        ui.model.textContent = "Model: the server cannot be reached.";
      });
  }

  // ------------------------------------------------------------------ sending a file

  function stopTicker() {
    if (state.ticker) clearInterval(state.ticker);
    state.ticker = 0;
  }

  function endRequest() {
    stopTicker();
    state.xhr = null;
    ui.progress.hidden = true;
    ui.cancel.hidden = true;
    ui.dropzone.dataset.state = "idle";
  }

  function send(file) {
    if (state.xhr) state.xhr.abort();
    clearError();
    clearResults();
    const form = new FormData();
    form.append("file", file, file.name);

    const xhr = new XMLHttpRequest();
    state.xhr = xhr;
    xhr.open("POST", "/v1/predict");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);

    ui.progress.hidden = false;
    ui.progress.value = 0;
    ui.cancel.hidden = false;
    ui.dropzone.dataset.state = "busy";
    setStatus("Uploading " + file.name + "\u2026 0 %", "uploading");

    xhr.upload.onprogress = (event) => {
      if (!event.lengthComputable || state.xhr !== xhr) return;
      const percent = Math.floor((100 * event.loaded) / Math.max(1, event.total));
      ui.progress.value = percent;
      setStatus("Uploading " + file.name + "\u2026 " + percent + " %", "uploading");
    };
    xhr.upload.onload = () => {
      if (state.xhr !== xhr) return;
      ui.progress.removeAttribute("value"); // indeterminate: the server is working
      const started = Date.now();
      const say = () => {
        const waited = Math.round((Date.now() - started) / 1000);
        setStatus(
          "Processing " + file.name + " on the server (features, then the model)\u2026" +
            (waited ? " " + waited + " s" : ""),
          "processing"
        );
      };
      say();
      stopTicker();
      state.ticker = setInterval(say, 1000);
    };
    xhr.onload = () => {
      if (state.xhr !== xhr) return;
      endRequest();
      if (xhr.status < 200 || xhr.status >= 300) {
        const text = errorText(xhr.status, xhr.responseText, xhr.getResponseHeader("Retry-After"));
        setStatus("Failed.", "error");
        showError(text);
        if (xhr.status === 401) {
          ui.tokenBox.open = true;
          ui.token.focus();
        }
        return;
      }
      let data;
      try {
        data = JSON.parse(xhr.responseText);
      } catch (_) {
        setStatus("Failed.", "error");
        showError("The server's answer is not JSON.");
        return;
      }
      show(file, data);
    };
    xhr.onerror = () => {
      if (state.xhr !== xhr) return;
      endRequest();
      setStatus("Failed.", "error");
      showError("The server cannot be reached (network error). Is taemi serve still running?");
    };
    xhr.onabort = () => {
      if (state.xhr !== xhr) return;
      endRequest();
      setStatus("Cancelled.", "idle");
    };
    xhr.send(form);
  }

  // ------------------------------------------------------------------ results

  function clearResults() {
    if (state.player) state.player.pause();
    cancelAnimationFrame(state.frame);
    ui.results.hidden = true;
    ui.playerBox.replaceChildren();
    if (state.objectUrl) URL.revokeObjectURL(state.objectUrl);
    Object.assign(state, { objectUrl: null, clip: null, player: null, playable: true, position: 0, timelines: [] });
  }

  function show(file, data) {
    const clip = Array.isArray(data.clips) && data.clips.length ? data.clips[0] : null;
    if (!clip) {
      const failure = Array.isArray(data.failures) && data.failures.length ? data.failures[0] : null;
      setStatus("Failed.", "error");
      showError(
        failure
          ? (failure.filename || file.name) + ": " + failure.error + " (error " + failure.status + ")"
          : "The server returned no result for this file."
      );
      return;
    }
    state.clip = clip;
    ui.resultName.textContent = clip.filename || file.name;
    ui.results.dataset.clip = clip.id || "";
    ui.results.dataset.filename = clip.filename || file.name;
    ui.results.dataset.run = data.run || "";
    const emotions = Array.isArray(data.emotions) && data.emotions.length ? data.emotions : Object.keys(clip.intensities || {});

    showPlayer(file, clip);
    showBars(emotions, clip);
    showTranscript(clip);
    showModalities(clip);
    showTimings(clip);
    ui.results.hidden = false; // before the timelines: they measure their width
    showTimelines(clip);
    setStatus("Done: " + (clip.filename || file.name) + ".", "done");
  }

  function showBars(emotions, clip) {
    const rows = emotions.map((name, i) => {
      const value = Number((clip.intensities || {})[name]);
      const raw = (clip.raw || {})[name];
      const known = Number.isFinite(value);
      const text = known ? value.toFixed(3) : "n/a";
      const label = make("span", { className: "bar-name", id: "bar-name-" + i, text: name });
      const fill = make("span", { className: "bar-fill" });
      fill.style.width = (known ? Math.min(1, Math.max(0, value)) * 100 : 0) + "%";
      const track = make(
        "span",
        {
          className: "bar-track",
          role: "meter",
          "aria-labelledby": "bar-name-" + i,
          "aria-valuemin": "0",
          "aria-valuemax": "1",
          "aria-valuenow": known ? String(value) : "0",
          "aria-valuetext": text,
        },
        [fill]
      );
      const shown = make("span", { className: "bar-value", text });
      const dataset = { emotion: name, value: known ? String(value) : "" };
      if (raw !== undefined && raw !== null) dataset.raw = String(raw);
      const row = make("li", { className: "bar", dataset }, [label, track, shown]);
      if (raw !== undefined && raw !== null && Number.isFinite(Number(raw))) {
        row.title = name + ": " + text + " (model output before clipping: " + Number(raw).toFixed(4) + ")";
      }
      return row;
    });
    ui.bars.replaceChildren(...rows);
  }

  function showTranscript(clip) {
    const text = (clip.transcript || "").trim();
    ui.transcript.textContent = text || "(no speech recognised)";
    ui.transcript.dataset.empty = text ? "false" : "true";
  }

  function modalityInfo(clip, name) {
    const info = (clip.modalities || {})[name];
    return info && typeof info === "object" ? info : { present: false, reason: "not reported by the server" };
  }

  function showModalities(clip) {
    const names = MODALITIES.concat(Object.keys(clip.modalities || {}).filter((m) => !MODALITIES.includes(m)));
    const rows = names.map((name) => {
      const info = modalityInfo(clip, name);
      const present = Boolean(info.present);
      const mark = make("span", { className: "mark", "aria-hidden": "true", text: present ? "\u2713" : "\u2717" });
      const words = present
        ? ": used"
        : ": missing" + (info.reason ? " \u2014 " + info.reason : "") + "; the model used its learned stand-in";
      return make("li", { dataset: { modality: name, present: String(present) } }, [
        mark,
        " ",
        make("strong", { text: MODALITY_NAMES[name] || name }),
        words,
      ]);
    });
    ui.modalities.replaceChildren(...rows);
  }

  function showTimings(clip) {
    const timings = clip.timings || {};
    const parts = Object.entries(timings)
      .filter(([key, value]) => key !== "total" && Number.isFinite(value))
      .map(([key, value]) => key + " " + seconds(value));
    let text = "";
    if (Number.isFinite(timings.total)) text += "Server time " + seconds(timings.total);
    if (parts.length) text += " (" + parts.join(", ") + ")";
    if (Number.isFinite(clip.media_seconds)) text += (text ? "; " : "") + "media " + seconds(clip.media_seconds);
    ui.timings.textContent = text ? text + "." : "";
  }

  // ------------------------------------------------------------------ player

  function showPlayer(file, clip) {
    state.objectUrl = URL.createObjectURL(file);
    const audio = isAudioFile(file) || (!file.type && !modalityInfo(clip, "vision").present);
    const player = make(audio ? "audio" : "video", { id: "player", controls: "", preload: "metadata" });
    if (!audio) player.setAttribute("playsinline", "");
    player.setAttribute("aria-label", "Your clip: " + (clip.filename || file.name));
    player.src = state.objectUrl;
    state.player = player;
    state.playable = !(file.type && player.canPlayType(file.type) === "");
    ui.playerBox.dataset.kind = audio ? "audio" : "video";
    ui.playerBox.replaceChildren(player);
    ui.playerBox.dataset.playable = "true";
    ui.playerNote.hidden = true;
    if (!state.playable) cannotPlay(file, clip);

    player.addEventListener("error", () => {
      if (state.player !== player) return;
      const error = player.error;
      // MEDIA_ERR_SRC_NOT_SUPPORTED, or nothing loaded: the browser cannot play this format
      if (player.readyState === 0 || (error && error.code === 4)) cannotPlay(file, clip);
      else {
        ui.playerNote.textContent =
          "The player stopped with an error (" + ((error && error.message) || "unknown") +
          "); choose the file again to reload it. The results below are not affected.";
        ui.playerNote.hidden = false;
      }
    });
    for (const name of ["loadedmetadata", "durationchange"]) player.addEventListener(name, redrawTimelines);
    for (const name of ["timeupdate", "seeked", "seeking"]) player.addEventListener(name, movePlayheads);
    player.addEventListener("play", followPlayer);
  }

  function cannotPlay(file, clip) {
    state.playable = false;
    ui.playerBox.dataset.playable = "false";
    ui.playerNote.textContent =
      "This browser cannot play " + (extension(file.name) ? "." + extension(file.name) + " files" : "this file") +
      ", so there is no picture or sound here; the results below are still valid. The timelines span the " +
      "clip's length as the server measured it (" + seconds(clip.media_seconds) + ").";
    ui.playerNote.hidden = false;
    redrawTimelines();
  }

  /** The media length the timelines span: the player's when it knows it, else the server's. */
  function duration() {
    const player = state.player;
    if (state.playable && player && Number.isFinite(player.duration) && player.duration > 0) return player.duration;
    const clip = state.clip || {};
    if (Number.isFinite(clip.media_seconds) && clip.media_seconds > 0) return clip.media_seconds;
    let last = 0;
    for (const timeline of state.timelines) last = Math.max(last, ...timeline.attention.times);
    return last > 0 ? last : 1;
  }

  function position() {
    const player = state.player;
    if (state.playable && player && Number.isFinite(player.currentTime)) return player.currentTime;
    return state.position;
  }

  function seek(time) {
    const total = duration();
    const t = Math.min(total, Math.max(0, time));
    state.position = t;
    if (state.player) {
      try {
        // not the very end: some decoders fail a seek there (Chromium's MP3 demuxer does)
        state.player.currentTime = Math.min(t, Math.max(0, total - 0.05));
      } catch (_) {
        /* a player without media: the playhead still moves */
      }
    }
    movePlayheads();
  }

  function followPlayer() {
    cancelAnimationFrame(state.frame);
    const step = () => {
      movePlayheads();
      if (state.player && !state.player.paused && !state.player.ended) state.frame = requestAnimationFrame(step);
    };
    state.frame = requestAnimationFrame(step);
  }

  // ------------------------------------------------------------------ attention timelines

  function showTimelines(clip) {
    state.timelines = [];
    for (const modality of ["audio", "vision"]) {
      const row = $("timeline-" + modality);
      const slot = row.querySelector(".timeline-slot");
      const attention = (clip.attention || {})[modality];
      const usable =
        attention &&
        Array.isArray(attention.times) &&
        Array.isArray(attention.weights) &&
        attention.times.length > 0 &&
        attention.times.length === attention.weights.length;
      if (!usable) {
        const info = modalityInfo(clip, modality);
        const why = !info.present
          ? (modality === "audio" ? "no audio" : "no face frames") + (info.reason ? ": " + info.reason : "")
          : "the model returned no attention for it";
        row.dataset.available = "false";
        slot.replaceChildren(make("p", { className: "timeline-na", text: "Not available (" + why + ")." }));
        continue;
      }
      row.dataset.available = "true";
      const canvas = make("canvas", { className: "timeline-canvas", "aria-hidden": "true" });
      const head = make("span", { className: "playhead", "aria-hidden": "true" });
      const box = make(
        "div",
        {
          className: "timeline",
          tabindex: "0",
          role: "slider",
          "aria-labelledby": "timeline-" + modality + "-name",
          "aria-describedby": "timeline-" + modality + "-peak",
          "aria-valuemin": "0",
          dataset: { modality },
        },
        [canvas, head]
      );
      const peak = make("span", { className: "visually-hidden", id: "timeline-" + modality + "-peak", text: peakText(attention) });
      slot.replaceChildren(box, peak);
      const timeline = { box, canvas, head, attention };
      state.timelines.push(timeline);

      box.addEventListener("click", (event) => {
        const rect = box.getBoundingClientRect();
        seek(((event.clientX - rect.left) / Math.max(1, rect.width)) * duration());
      });
      box.addEventListener("keydown", (event) => {
        const step = Math.max(0.1, duration() / 20);
        const moves = {
          ArrowLeft: position() - step,
          ArrowDown: position() - step,
          ArrowRight: position() + step,
          ArrowUp: position() + step,
          Home: 0,
          End: duration(),
        };
        if (!(event.key in moves)) return;
        event.preventDefault();
        seek(moves[event.key]);
      });
    }
    redrawTimelines();
  }

  function peakText(attention) {
    let best = 0;
    attention.weights.forEach((w, i) => {
      if (w > attention.weights[best]) best = i;
    });
    return "Strongest attention at " + seconds(attention.times[best]) + " (" + attention.times.length + " points).";
  }

  function drawTimeline(timeline) {
    const { canvas, attention } = timeline;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    if (!width || !height) return;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, width, height);

    const style = getComputedStyle(canvas);
    const total = duration();
    const times = attention.times.map(Number);
    const weights = attention.weights.map((w) => (Number.isFinite(Number(w)) ? Math.max(0, Number(w)) : 0));
    const top = Math.max(...weights) || 1;
    const n = times.length;
    const x = (t) => (Math.min(total, Math.max(0, t)) / total) * width;

    // each point owns the time from the midpoint with its left neighbour to the one with its right
    ctx.fillStyle = style.color;
    for (let i = 0; i < n; i++) {
      const before = i > 0 ? (times[i - 1] + times[i]) / 2 : times[i] - (n > 1 ? (times[1] - times[0]) / 2 : total / 100);
      const after = i < n - 1 ? (times[i] + times[i + 1]) / 2 : times[i] + (n > 1 ? (times[i] - times[i - 1]) / 2 : total / 100);
      const left = x(before);
      const right = Math.max(left + 1, x(after) - (x(after) - left > 4 ? 1 : 0));
      const h = (weights[i] / top) * (height - 2);
      ctx.fillRect(left, height - h, right - left, h);
    }
    ctx.fillStyle = style.borderTopColor;
    ctx.fillRect(0, height - 1, width, 1); // baseline
  }

  function drawAxis() {
    const total = duration();
    const width = ui.axis.clientWidth || 300;
    const most = Math.max(2, Math.floor(width / 70));
    const step = TICK_STEPS.find((s) => total / s <= most) || TICK_STEPS[TICK_STEPS.length - 1];
    const ticks = [];
    for (let t = 0; t <= total + 1e-9; t += step) ticks.push(t);
    ui.axis.replaceChildren(
      ...ticks.map((t) => {
        const frac = t / total;
        const label = make("span", { className: "tick", text: (step < 1 ? t.toFixed(step < 0.25 ? 1 : 2) : String(Math.round(t))) + " s" });
        label.style.left = frac * 100 + "%";
        label.dataset.edge = frac < 0.05 ? "start" : frac > 0.9 ? "end" : "middle";
        return label;
      })
    );
  }

  function redrawTimelines() {
    if (!state.clip) return;
    for (const timeline of state.timelines) drawTimeline(timeline);
    drawAxis();
    movePlayheads();
  }

  function movePlayheads() {
    const total = duration();
    const now = position();
    const percent = Math.min(100, Math.max(0, (now / total) * 100));
    ui.position.textContent = "Playhead " + seconds(now) + " of " + seconds(total);
    for (const { box, head } of state.timelines) {
      head.style.left = percent + "%";
      box.setAttribute("aria-valuemax", total.toFixed(2));
      box.setAttribute("aria-valuenow", now.toFixed(2));
      box.setAttribute("aria-valuetext", seconds(now) + " of " + seconds(total));
    }
  }

  // ------------------------------------------------------------------ picking and dropping

  function pick(files) {
    if (!files || !files.length) return;
    send(files[0]);
    if (files.length > 1) showError("Only the first file (" + files[0].name + ") is sent; choose one clip at a time.");
  }

  function wireInputs() {
    ui.file.addEventListener("change", () => pick(ui.file.files));
    ui.form.addEventListener("submit", (event) => event.preventDefault());
    ui.cancel.addEventListener("click", () => state.xhr && state.xhr.abort());

    const zone = ui.dropzone;
    zone.addEventListener("dragenter", (event) => {
      event.preventDefault();
      zone.dataset.state = "over";
    });
    zone.addEventListener("dragover", (event) => {
      event.preventDefault();
      if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
      zone.dataset.state = "over";
    });
    zone.addEventListener("dragleave", (event) => {
      if (!zone.contains(event.relatedTarget)) zone.dataset.state = state.xhr ? "busy" : "idle";
    });
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.dataset.state = "idle";
      pick(event.dataTransfer && event.dataTransfer.files);
    });
    // a file dropped next to the zone must not replace the page
    for (const name of ["dragover", "drop"]) window.addEventListener(name, (event) => event.preventDefault());

    if (typeof ResizeObserver === "function") new ResizeObserver(redrawTimelines).observe(ui.results);
    else window.addEventListener("resize", redrawTimelines);
  }

  restoreToken();
  wireInputs();
  loadModel();
})();
