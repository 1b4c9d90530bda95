/* Tuneboard front-end glue: charts, sparklines, histograms, uploads, chat streaming.
 *
 * No framework, no build step, CSP-safe: no inline scripts, no eval, no innerHTML. Server
 * and user data are only ever written with textContent / Text nodes / attributes. Every
 * behaviour is wired from data- attributes on DOMContentLoaded and again after htmx swaps
 * (htmx:afterSettle, htmx:load); wiring the same element twice is a no-op.
 *
 * Load order (all `defer`): htmx.min.js, sse.min.js, uPlot.iife.min.js, app.js.
 *
 * CONTRACT WITH THE TEMPLATES
 *
 * Charts (uPlot)
 *   <div class="chart" data-chart="loss" data-events-url="/api/jobs/7/events"
 *        data-series='{"exponent_axis": false, "series": [{"label": "loss", "column": "loss",
 *          "color": "--chart-1", "width": 1.5, "digits": 4, "scale": 1, "points": false,
 *          "smooth": false, "dash": null}, ...]}' data-height="240"></div>
 *   - What to draw comes from the server (app/services/job_views.py CHARTS): each series
 *     names a metric row's column; this file knows no metric names. `digits` -1 is
 *     exponent notation, `scale` multiplies each value, `points` draws dots only (sparse
 *     eval rows), `smooth` is an EMA (0.9) of the column.
 *   - The rows come only from the SSE stream at events-url: `metric` events (data = one
 *     row as JSON, id = row id). It sends every row after Last-Event-ID (all of them on
 *     the first connect), then each new row, so a reconnect resumes where it left off;
 *     rows are taken once per id. Charts with the same events-url share ONE EventSource
 *     (also shared with htmx `sse-connect` on the same URL, see below).
 *   - SSE `status` event (data: "succeeded" or {"status": "succeeded"}) or `done`: a
 *     terminal status (succeeded|failed|cancelled) closes the charts' stream.
 *   - x = step. A row with the same step as the last point is merged into it (eval rows);
 *     a row with a smaller step, or the first row of another attempt (a resume), replaces
 *     the points from its step on: one point a step, the latest attempt's.
 *   - After each append the div's data-points="<n>" is the number of points drawn.
 *     data-status mirrors the job status the charts know about.
 *   - Charts follow their container's width; height is data-height (default 240).
 *
 * Job progress (the live job page's header)
 *   <div data-progress-events="/api/jobs/7/events"> ... <progress> ... <span class="step">
 *     <span class="total"> <span class="epoch"> <span class="eta"> ... </div>
 *   - SSE `progress` events (data: {progress_step, progress_total, epoch, eta}) are sent
 *     when only the step moved: they set the <progress> in .job-progress and the spans'
 *     text, with no request. Any other change is a `status` event, on which htmx fetches
 *     the whole header partial (hx-trigger="sse:status"), so this stays small.
 *   - Stops listening at `done` or a terminal status (shares the charts' EventSource).
 *
 * Compare charts (several jobs overlaid, not live)
 *   <div class="chart" data-chart="compare" data-series="<column>" [data-dots]
 *        data-compare-url="/api/jobs/compare?ids=1,2"></div>
 *   - GET compare-url -> {"jobs": [{id, name, status, metrics: {step: [...],
 *     <column>: [...], ...}}, ...]}; one line per job (x = step, gaps spanned), coloured
 *     --chart-1..4 in turn, labelled "#<id> <name>"; data-dots: dots too (eval columns).
 *   - data-series-count="<n>" is the number of jobs with at least one point drawn;
 *     data-points="<n>" the number of distinct steps.
 *
 * Sparklines
 *   <canvas class="sparkline" data-values="[1.2,1.1,null,0.9]"></canvas>
 *   A tiny line in the canvas's CSS colour (`color`), sized by CSS (default 100x24).
 *
 * Histogram
 *   <div class="histogram" data-bins='[{"lo":0,"hi":64,"count":12},...]'
 *        data-max-len="2048"></div>
 *   Bars on a canvas; a dashed vertical marker at data-max-len; bars above the max
 *   length (rows that will be truncated) are drawn in the danger colour. Hover shows
 *   the bin in the canvas's title.
 *
 * Upload
 *   <form class="upload" data-upload-url="/api/datasets" data-max-bytes="...">
 *     <div class="dropzone">Drop a file or click <input type="file" name="file"></div>
 *     ...other fields...  [<button type="submit">]  [<button type="button" data-upload-cancel>]
 *   </form>
 *   Drag-and-drop onto .dropzone, or click it / use the picker. With a submit button the
 *   upload starts on submit; without one it starts as soon as a file is chosen.
 *   XMLHttpRequest POST multipart: the form's fields plus the file as field `file`.
 *   Progress in the form's <progress> (created if missing) and `.upload-status`
 *   ("42% · 12.0 MB of 28.6 MB"). 2xx JSON {"url": ...} -> navigate there. Errors
 *   {"error": {"message", "hint"}} are shown as text in the form's `.error` box
 *   (`.error-message`, `.error-hint`; created if missing).
 *
 * Chat streaming (playground)
 *   <form class="chat" data-stream-url="/v1/chat/completions" data-model="my-adapter">
 *     <textarea name="message"></textarea> ...other fields (model, temperature, ...)...
 *     <button type="submit">Send</button> <button type="button" class="chat-stop">Stop</button>
 *     <div class="chat-output"></div> <div class="chat-stats"></div>
 *   </form>
 *   Side by side: leave data-stream-url off the form and put it on child panes, each with
 *   its own .chat-output/.chat-stats and optional data-model; one submit streams to all.
 *   POST JSON (fetch): the form's fields (numbers as numbers, checkboxes as booleans),
 *   plus `messages` (this pane's history + the new user turn, from the `message` or
 *   `prompt` field), `stream: true`, and `model` from data-model when set. The
 *   text/event-stream body is read with a ReadableStream; each `data:` may be an OpenAI
 *   chunk (choices[0].delta.content), {"token"}, {"text"}, or plain text; `[DONE]` or an
 *   `event: done` ends it; `event: error` / {"error": {...}} shows the error. Tokens are
 *   appended as text. `.chat-stop` aborts (AbortController). `.chat-stats` shows
 *   first-token latency, tokens/s and the token count. Enter sends, Shift+Enter = newline.
 *   data-gpu-url on the form: fetched at each send; its {"waiting": "..."} (the job training
 *   on the chat's GPU) replaces "waiting for the first token" until the first token.
 *
 * Confirmation
 *   Prefer htmx's hx-confirm="...". For anything else (plain forms, links, buttons),
 *   data-confirm="..." asks window.confirm first and cancels the action on "Cancel".
 *
 * Shared EventSources
 *   htmx.createEventSource is replaced so `sse-connect="/api/jobs/7/events"` and the
 *   charts on the same URL use one connection (browsers allow ~6 per host on HTTP/1.1).
 */
(function () {
  "use strict";

  var TERMINAL = { succeeded: true, failed: true, cancelled: true };
  var wired = new WeakSet();

  // ---------------------------------------------------------------- helpers

  function each(root, selector, fn) {
    if (root.nodeType === 1 && root.matches(selector)) fn(root);
    var found = root.querySelectorAll ? root.querySelectorAll(selector) : [];
    for (var i = 0; i < found.length; i++) fn(found[i]);
  }

  function once(el, fn) {
    if (wired.has(el)) return;
    wired.add(el);
    try {
      fn(el);
    } catch (err) {
      console.error("tuneboard: could not wire", el, err);
    }
  }

  function parseJSON(text, fallback) {
    try {
      return JSON.parse(text);
    } catch (err) {
      return fallback;
    }
  }

  function cssVar(name, fallback) {
    var v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  function absoluteUrl(url) {
    return new URL(url, window.location.href).href;
  }

  function withParam(url, name, value) {
    var u = new URL(url, window.location.href);
    u.searchParams.set(name, String(value));
    return u.href;
  }

  function formatBytes(n) {
    if (n < 1024) return n + " B";
    var units = ["KB", "MB", "GB", "TB"];
    var i = -1;
    do {
      n /= 1024;
      i++;
    } while (n >= 1024 && i < units.length - 1);
    return n.toFixed(n < 10 ? 1 : 0) + " " + units[i];
  }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = text;
    return node;
  }

  /** The `.error` box inside `container` (created at the top if missing), filled as text. */
  function showError(container, message, hint) {
    var box = container.querySelector(".error");
    if (!box) {
      box = el("div", "error");
      container.insertBefore(box, container.firstChild);
    }
    box.setAttribute("role", "alert");
    var msg = box.querySelector(".error-message");
    if (!msg) box.appendChild((msg = el("p", "error-message")));
    var tip = box.querySelector(".error-hint");
    if (!tip) box.appendChild((tip = el("p", "error-hint")));
    msg.textContent = message || "Something went wrong.";
    tip.textContent = hint || "";
    box.hidden = false;
  }

  function hideError(container) {
    var box = container.querySelector(".error");
    if (box) box.hidden = true;
  }

  /** {message, hint} from an API error body (JSON text), with a fallback for non-JSON. */
  function errorFromBody(text, status) {
    var body = parseJSON(text, null);
    var err = body && body.error;
    if (err && typeof err === "object") {
      return { message: String(err.message || "Request failed (HTTP " + status + ")."), hint: err.hint ? String(err.hint) : "" };
    }
    if (body && typeof body.detail === "string") return { message: body.detail, hint: "" };
    return { message: "Request failed (HTTP " + status + ").", hint: status === 413 ? "The file is larger than the server accepts." : "" };
  }

  // ------------------------------------------------------ shared EventSources

  // One real EventSource per absolute URL. Each user gets a small handle with the
  // EventSource methods htmx's SSE extension and the charts use; closing a handle drops
  // its listeners, and the connection closes when the last handle does. If the browser
  // gives up on a connection (readyState CLOSED), it is reopened with backoff while
  // handles remain, and every handle's listeners move to the new connection.
  var sources = new Map();

  function acquireEventSource(url) {
    var key = absoluteUrl(url);
    var entry = sources.get(key);
    if (!entry) {
      entry = { url: key, es: null, handles: new Set(), retry: 0, timer: null, lastId: null };
      sources.set(key, entry);
    }
    var handle = {
      url: key,
      listeners: [],
      onopen: null,
      onerror: null,
      onmessage: null,
      closed: false,
      get readyState() {
        return handle.closed ? 2 : entry.es ? entry.es.readyState : 0;
      },
      addEventListener: function (type, fn) {
        handle.listeners.push([type, fn]);
        if (entry.es) entry.es.addEventListener(type, fn);
      },
      removeEventListener: function (type, fn) {
        handle.listeners = handle.listeners.filter(function (l) {
          return !(l[0] === type && l[1] === fn);
        });
        if (entry.es) entry.es.removeEventListener(type, fn);
      },
      close: function () {
        if (handle.closed) return;
        handle.closed = true;
        if (entry.es) {
          handle.listeners.forEach(function (l) {
            entry.es.removeEventListener(l[0], l[1]);
          });
        }
        entry.handles.delete(handle);
        if (entry.handles.size === 0) {
          clearTimeout(entry.timer);
          if (entry.es) entry.es.close();
          sources.delete(key);
        }
      },
    };
    entry.handles.add(handle);
    if (!entry.es || entry.es.readyState === 2) connect(entry);
    else
      handle.listeners.forEach(function (l) {
        entry.es.addEventListener(l[0], l[1]);
      });
    return handle;
  }

  function connect(entry) {
    clearTimeout(entry.timer);
    if (entry.es) entry.es.close();
    // A new EventSource sends no Last-Event-ID: say where to resume in the URL instead.
    var es = new EventSource(entry.lastId ? withParam(entry.url, "after", entry.lastId) : entry.url);
    entry.es = es;
    es.addEventListener("metric", function (evt) {
      if (evt.lastEventId) entry.lastId = evt.lastEventId;
    });
    entry.handles.forEach(function (h) {
      h.listeners.forEach(function (l) {
        es.addEventListener(l[0], l[1]);
      });
    });
    es.onopen = function (evt) {
      entry.retry = 0;
      entry.handles.forEach(function (h) {
        if (h.onopen) h.onopen(evt);
      });
    };
    es.onmessage = function (evt) {
      entry.handles.forEach(function (h) {
        if (h.onmessage) h.onmessage(evt);
      });
    };
    es.onerror = function (evt) {
      var dead = es.readyState === 2;
      entry.handles.forEach(function (h) {
        if (!h.onerror) return;
        h.onerror(evt);
        // Like a real EventSource, a handle whose owner watches errors (htmx's SSE
        // extension) is dead once the connection is CLOSED; its owner makes a new one.
        if (dead) h.close();
      });
      if (es.readyState === 2 && entry.handles.size > 0 && entry.es === es) {
        entry.retry = Math.min(entry.retry + 1, 6);
        entry.timer = setTimeout(function () {
          if (entry.handles.size > 0 && entry.es === es) connect(entry);
        }, 500 * Math.pow(2, entry.retry));
      }
    };
  }

  if (window.htmx) {
    window.htmx.createEventSource = acquireEventSource;
  }

  // ------------------------------------------------------------ job progress

  function wireProgress(el) {
    var source = acquireEventSource(el.getAttribute("data-progress-events"));
    var text = function (selector, value) {
      var node = el.querySelector(selector);
      if (node) node.textContent = String(value);
    };
    source.addEventListener("progress", function (evt) {
      var data = parseJSON(evt.data, null);
      if (!data || typeof data !== "object") return;
      var bar = el.querySelector(".job-progress progress");
      if (bar && isFinite(data.progress_total) && isFinite(data.progress_step)) {
        bar.max = Number(data.progress_total);
        bar.value = Number(data.progress_step);
      }
      text(".job-progress .step", Number(data.progress_step));
      text(".job-progress .total", Number(data.progress_total));
      if (isFinite(data.epoch)) text(".job-progress .epoch", Number(data.epoch).toFixed(2));
      if (typeof data.eta === "string") text(".job-progress .eta", data.eta);
    });
    var stop = function (evt) {
      var data = parseJSON(evt.data, evt.data);
      var status = data && typeof data === "object" ? data.status : data;
      if (evt.type === "done" || TERMINAL[status]) source.close();
    };
    source.addEventListener("status", stop);
    source.addEventListener("done", stop);
  }

  // ------------------------------------------------------------------ charts

  // A feed is one job's metric rows, shared by every chart with the same events-url.
  var feeds = new Map();

  function num(v) {
    return typeof v === "number" && isFinite(v) ? v : null;
  }

  function fmt(digits) {
    return function (u, v) {
      if (v == null) return "–";
      return digits < 0 ? v.toExponential(2) : v.toFixed(digits);
    };
  }

  function exponentAxis(u, splits) {
    return splits.map(function (v) {
      return v == null ? "" : v.toExponential(1);
    });
  }

  function getFeed(eventsUrl) {
    var key = absoluteUrl(eventsUrl);
    var feed = feeds.get(key);
    if (feed) return feed;
    feed = { eventsUrl: key, rows: [], lastId: -Infinity, status: null, charts: new Set(), source: null };
    feeds.set(key, feed);
    return feed;
  }

  // The stream sends the rows after Last-Event-ID (all of them on the first connect), then
  // each new row; a reopened connection resumes the same way, so the rows come from here only.
  function openStream(feed) {
    if (feed.source || TERMINAL[feed.status] || !liveCharts(feed)) return;
    var source = acquireEventSource(feed.eventsUrl);
    feed.source = source;
    source.addEventListener("metric", function (evt) {
      var row = parseJSON(evt.data, null);
      if (!row || typeof row !== "object") return;
      if (row.id == null && evt.lastEventId) row.id = Number(evt.lastEventId);
      accept(feed, row);
    });
    var stop = function (evt) {
      var data = parseJSON(evt.data, evt.data);
      var status = data && typeof data === "object" ? data.status : data;
      if (typeof status === "string" && /^[a-z_]+$/.test(status)) setStatus(feed, status);
      if (evt.type === "done" || TERMINAL[feed.status]) closeStream(feed);
    };
    source.addEventListener("status", stop);
    source.addEventListener("done", stop);
  }

  function closeStream(feed) {
    if (feed.source) feed.source.close();
    feed.source = null;
  }

  function setStatus(feed, status) {
    feed.status = status;
    feed.charts.forEach(function (chart) {
      chart.el.setAttribute("data-status", status);
    });
  }

  /** Take one row into the feed (once per id, in id order) and hand it to every chart. */
  function accept(feed, row) {
    var id = num(row.id);
    if (id != null) {
      if (id <= feed.lastId) return;
      feed.lastId = id;
    }
    feed.rows.push(row);
    if (!liveCharts(feed)) {
      closeStream(feed);
      return;
    }
    feed.charts.forEach(function (chart) {
      appendRow(chart, row);
    });
  }

  /** Drop charts whose element left the page; returns how many remain. */
  function liveCharts(feed) {
    feed.charts.forEach(function (chart) {
      if (!chart.el.isConnected) destroyChart(chart);
    });
    return feed.charts.size;
  }

  function destroyChart(chart) {
    chart.feed.charts.delete(chart);
    if (chart.resize) chart.resize.disconnect();
    if (chart.plot) chart.plot.destroy();
    chart.plot = null;
    if (chart.feed.charts.size === 0) {
      closeStream(chart.feed);
      feeds.delete(chart.feed.eventsUrl);
    }
  }

  function wireChart(div) {
    if (div.getAttribute("data-chart") === "compare") {
      wireCompare(div);
      return;
    }
    var spec = parseJSON(div.getAttribute("data-series"), null);
    var eventsUrl = div.getAttribute("data-events-url");
    if (!spec || !spec.series || !eventsUrl || typeof uPlot === "undefined") {
      if (typeof uPlot === "undefined") console.error("tuneboard: uPlot is not loaded");
      return;
    }
    var chart = {
      el: div,
      spec: spec,
      // columns: x (step), then one array per series
      data: [[]].concat(
        spec.series.map(function () {
          return [];
        })
      ),
      plot: null,
      dirty: false,
      feed: null,
      attempt: null, // the attempt of the last row taken
    };
    var empty = el("div", "chart-empty", "Waiting for the first metrics…");
    div.appendChild(empty);
    chart.empty = empty;
    div.setAttribute("data-points", "0");
    build(chart);

    var feed = getFeed(eventsUrl);
    chart.feed = feed;
    feed.charts.add(chart);
    if (feed.status) div.setAttribute("data-status", feed.status);
    feed.rows.forEach(function (row) {
      appendRow(chart, row);
    });
    openStream(feed);

    chart.resize = new ResizeObserver(function () {
      if (chart.plot && div.clientWidth > 0) chart.plot.setSize(size(chart));
    });
    chart.resize.observe(div);
  }

  function size(chart) {
    var h = parseInt(chart.el.getAttribute("data-height"), 10) || 240;
    return { width: Math.max(chart.el.clientWidth, 100), height: h };
  }

  function build(chart) {
    if (chart.plot) chart.plot.destroy();
    var axis = cssVar("--axis", "#666");
    var grid = cssVar("--grid", "#eee");
    var series = [{ label: "step" }].concat(
      chart.spec.series.map(function (s) {
        var color = cssVar(s.color, "#2f6feb");
        var out = { label: s.label, stroke: color, width: s.width || 1, value: fmt(s.digits), spanGaps: true };
        if (s.dash) out.dash = s.dash;
        if (s.points) {
          out.paths = function () {
            return null;
          };
          out.points = { show: true, size: 7, fill: color, stroke: color };
        } else {
          out.points = { show: false };
        }
        return out;
      })
    );
    var yAxis = { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, size: 55 };
    if (chart.spec.exponent_axis) {
      yAxis.values = exponentAxis; // an explicit undefined would replace uPlot's default
      yAxis.size = 70;
    }
    var opts = Object.assign(size(chart), {
      series: series,
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: false } },
      axes: [
        { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } },
        yAxis,
      ],
    });
    chart.plot = new uPlot(opts, chart.data, chart.el);
  }

  /** Add one metric row to a chart's columns; same step merges, a lower step rewinds. */
  function appendRow(chart, row) {
    var step = num(row.step);
    if (step == null) return;
    var cols = chart.data;
    var xs = cols[0];

    // A resumed attempt logs from its checkpoint's step again: its points win, and its first
    // row never merges into a point of the attempt before it.
    var attempt = num(row.attempt);
    var resumed = attempt != null && chart.attempt != null && attempt !== chart.attempt;
    if (attempt != null) chart.attempt = attempt;
    while (xs.length && (xs[xs.length - 1] > step || (resumed && xs[xs.length - 1] === step))) {
      for (var c = 0; c < cols.length; c++) cols[c].pop();
    }
    var merge = xs.length > 0 && xs[xs.length - 1] === step;
    if (!merge) {
      xs.push(step);
      for (var k = 1; k < cols.length; k++) cols[k].push(null);
    }
    var i = xs.length - 1;

    chart.spec.series.forEach(function (s, j) {
      var col = cols[j + 1];
      var v = num(row[s.column]);
      if (v != null) v *= s.scale;
      if (v == null && merge) return; // an eval row at the same step keeps the train values
      if (s.smooth && v != null) {
        // EMA from the previous smoothed point, so merges and rewinds stay exact.
        var prev = null;
        for (var p = i - 1; p >= 0 && prev == null; p--) prev = col[p];
        if (prev != null) v = 0.9 * prev + 0.1 * v;
      }
      col[i] = v;
    });

    chart.el.setAttribute("data-points", String(xs.length));
    if (chart.empty) {
      chart.empty.remove();
      chart.empty = null;
    }
    scheduleDraw(chart);
  }

  function scheduleDraw(chart) {
    if (chart.dirty) return;
    chart.dirty = true;
    requestAnimationFrame(function () {
      chart.dirty = false;
      if (chart.plot) chart.plot.setData(chart.data);
    });
  }

  // ---------------------------------------------------------- compare charts

  var COMPARE_COLORS = ["--chart-1", "--chart-2", "--chart-3", "--chart-4"];

  function wireCompare(div) {
    var field = div.getAttribute("data-series") || "loss";
    var url = div.getAttribute("data-compare-url");
    if (!url || typeof uPlot === "undefined") return;
    var empty = el("div", "chart-empty", "Loading…");
    div.appendChild(empty);
    div.setAttribute("data-points", "0");
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (resp) {
        if (!resp.ok) throw new Error("HTTP " + resp.status);
        return resp.json();
      })
      .then(function (body) {
        var jobs = (body && body.jobs) || [];
        var steps = new Set();
        var lines = jobs.map(function (job) {
          var m = job.metrics || {};
          var xs = m.step || [];
          var ys = m[field] || [];
          var byStep = new Map();
          xs.forEach(function (x, i) {
            var v = num(ys[i]);
            if (num(x) != null && v != null) {
              byStep.set(x, v);
              steps.add(x);
            }
          });
          return { job: job, byStep: byStep };
        });
        var xs = Array.from(steps).sort(function (a, b) {
          return a - b;
        });
        var data = [xs].concat(
          lines.map(function (line) {
            return xs.map(function (x) {
              return line.byStep.has(x) ? line.byStep.get(x) : null;
            });
          })
        );
        var drawn = lines.filter(function (line) {
          return line.byStep.size > 0;
        }).length;
        if (xs.length === 0) {
          empty.textContent = "No " + field.replace("_", " ") + " recorded for these runs.";
        } else {
          empty.remove();
        }
        var axis = cssVar("--axis", "#666");
        var grid = cssVar("--grid", "#eee");
        var series = [{ label: "step" }].concat(
          lines.map(function (line, i) {
            var color = cssVar(COMPARE_COLORS[i % COMPARE_COLORS.length], "#2f6feb");
            var dash = i >= COMPARE_COLORS.length ? [6, 4] : undefined;
            var s = { label: "#" + line.job.id + " " + line.job.name, stroke: color, width: 2, spanGaps: true, value: fmt(4) };
            if (dash) s.dash = dash;
            s.points = { show: div.hasAttribute("data-dots"), size: 5, fill: color, stroke: color };
            return s;
          })
        );
        var h = parseInt(div.getAttribute("data-height"), 10) || 240;
        var plot = new uPlot(
          {
            width: Math.max(div.clientWidth, 100),
            height: h,
            series: series,
            legend: { live: true },
            scales: { x: { time: false } },
            axes: [
              { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid } },
              { stroke: axis, grid: { stroke: grid, width: 1 }, ticks: { stroke: grid }, size: 55 },
            ],
          },
          data,
          div
        );
        new ResizeObserver(function () {
          if (div.clientWidth > 0) plot.setSize({ width: Math.max(div.clientWidth, 100), height: h });
        }).observe(div);
        div.setAttribute("data-points", String(xs.length));
        div.setAttribute("data-series-count", String(drawn));
      })
      .catch(function (err) {
        empty.textContent = "Could not load the runs (" + err.message + ").";
        console.warn("tuneboard: compare fetch failed", url, err);
      });
  }

  // -------------------------------------------------------------- sparklines

  function setupCanvas(canvas) {
    var rect = canvas.getBoundingClientRect();
    var dpr = window.devicePixelRatio || 1;
    var w = Math.max(1, Math.round(rect.width || canvas.width));
    var h = Math.max(1, Math.round(rect.height || canvas.height));
    canvas.width = Math.round(w * dpr);
    canvas.height = Math.round(h * dpr);
    var ctx = canvas.getContext("2d");
    if (ctx) ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    return { ctx: ctx, w: w, h: h };
  }

  function drawSparkline(canvas) {
    var values = parseJSON(canvas.getAttribute("data-values") || "[]", []);
    if (!Array.isArray(values)) values = [];
    var c = setupCanvas(canvas);
    if (!c.ctx) return;
    var pts = [];
    values.forEach(function (v, i) {
      if (num(v) != null) pts.push([i, v]);
    });
    c.ctx.clearRect(0, 0, c.w, c.h);
    if (pts.length === 0) return;
    var min = Infinity;
    var max = -Infinity;
    pts.forEach(function (p) {
      min = Math.min(min, p[1]);
      max = Math.max(max, p[1]);
    });
    var span = max - min || 1;
    var pad = 2;
    var n = Math.max(values.length - 1, 1);
    var x = function (i) {
      return pad + (i / n) * (c.w - 2 * pad);
    };
    var y = function (v) {
      return c.h - pad - ((v - min) / span) * (c.h - 2 * pad);
    };
    c.ctx.strokeStyle = getComputedStyle(canvas).color;
    c.ctx.lineWidth = 1.5;
    c.ctx.lineJoin = "round";
    c.ctx.beginPath();
    pts.forEach(function (p, k) {
      if (k === 0) c.ctx.moveTo(x(p[0]), y(p[1]));
      else c.ctx.lineTo(x(p[0]), y(p[1]));
    });
    c.ctx.stroke();
    var last = pts[pts.length - 1];
    c.ctx.fillStyle = c.ctx.strokeStyle;
    c.ctx.beginPath();
    c.ctx.arc(x(last[0]), y(last[1]), 2, 0, 2 * Math.PI);
    c.ctx.fill();
    if (!canvas.hasAttribute("aria-label")) {
      canvas.setAttribute("role", "img");
      canvas.setAttribute("aria-label", "trend, last value " + last[1]);
    }
  }

  // --------------------------------------------------------------- histogram

  function wireHistogram(div) {
    var canvas = div.querySelector("canvas");
    if (!canvas) {
      canvas = document.createElement("canvas");
      div.appendChild(canvas);
    }
    var draw = function () {
      drawHistogram(div, canvas);
    };
    draw();
    new ResizeObserver(draw).observe(div);
    canvas.addEventListener("mousemove", function (evt) {
      var hit = (div._hitBins || []).find(function (b) {
        return evt.offsetX >= b.x0 && evt.offsetX < b.x1;
      });
      canvas.title = hit ? hit.lo + "–" + hit.hi + " tokens: " + hit.count + " rows" : "";
    });
  }

  function drawHistogram(div, canvas) {
    var bins = parseJSON(div.getAttribute("data-bins") || "[]", []);
    if (!Array.isArray(bins)) bins = [];
    bins = bins.filter(function (b) {
      return b && num(b.lo) != null && num(b.hi) != null && num(b.count) != null;
    });
    var maxLen = num(parseFloat(div.getAttribute("data-max-len")));
    var c = setupCanvas(canvas);
    if (!c.ctx) return;
    var ctx = c.ctx;
    ctx.clearRect(0, 0, c.w, c.h);
    var text = getComputedStyle(div).color;
    var font = "11px " + cssVar("--font", "sans-serif");
    ctx.font = font;
    if (bins.length === 0) {
      ctx.fillStyle = text;
      ctx.fillText("No rows", 8, 16);
      return;
    }
    var left = 40;
    var bottom = 20;
    var top = 14;
    var right = 8;
    var lo = Math.min.apply(null, bins.map(function (b) { return b.lo; }));
    var hi = Math.max.apply(null, bins.map(function (b) { return b.hi; }));
    if (maxLen != null) hi = Math.max(hi, maxLen * 1.02);
    var maxCount = Math.max.apply(null, bins.map(function (b) { return b.count; })) || 1;
    var plotW = c.w - left - right;
    var plotH = c.h - top - bottom;
    var x = function (v) {
      return left + ((v - lo) / (hi - lo || 1)) * plotW;
    };
    var y = function (v) {
      return top + plotH - (v / maxCount) * plotH;
    };

    var grid = cssVar("--grid", "#eee");
    var axis = cssVar("--axis", "#666");
    ctx.strokeStyle = grid;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(left, y(0) + 0.5);
    ctx.lineTo(c.w - right, y(0) + 0.5);
    ctx.moveTo(left, y(maxCount) + 0.5);
    ctx.lineTo(c.w - right, y(maxCount) + 0.5);
    ctx.stroke();

    var normal = cssVar("--chart-1", "#2f6feb");
    var over = cssVar("--chart-limit", "#c62f2f");
    var hits = [];
    bins.forEach(function (b) {
      var x0 = x(b.lo);
      var x1 = x(b.hi);
      ctx.fillStyle = maxLen != null && b.lo >= maxLen ? over : normal;
      ctx.fillRect(x0 + 0.5, y(b.count), Math.max(x1 - x0 - 1, 1), y(0) - y(b.count));
      hits.push({ x0: x0, x1: x1, lo: b.lo, hi: b.hi, count: b.count });
    });
    div._hitBins = hits;

    ctx.fillStyle = axis;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    ctx.fillText(String(maxCount), left - 6, y(maxCount));
    ctx.fillText("0", left - 6, y(0));
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(String(lo), left, c.h - bottom + 5);
    // The longest bin's edge, under that bar: the axis may run on to the max-length marker.
    var binHi = Math.max.apply(null, bins.map(function (b) { return b.hi; }));
    var hx = x(binHi);
    if (hx - left > 60) {
      ctx.textAlign = hx > c.w - right - 40 ? "right" : "center";
      ctx.fillText(String(Math.round(binHi)) + " tokens", hx, c.h - bottom + 5);
    }

    if (maxLen != null) {
      var mx = Math.round(x(maxLen)) + 0.5;
      ctx.strokeStyle = over;
      ctx.lineWidth = 1.5;
      ctx.setLineDash([5, 4]);
      ctx.beginPath();
      ctx.moveTo(mx, top - 4);
      ctx.lineTo(mx, y(0));
      ctx.stroke();
      ctx.setLineDash([]);
      ctx.fillStyle = over;
      ctx.textBaseline = "top";
      ctx.textAlign = mx > c.w / 2 ? "right" : "left";
      ctx.fillText("max length " + maxLen, mx + (mx > c.w / 2 ? -4 : 4), 0);
    }

    var total = bins.reduce(function (s, b) { return s + b.count; }, 0);
    canvas.setAttribute("role", "img");
    canvas.setAttribute(
      "aria-label",
      "Token length histogram of " + total + " rows" + (maxLen != null ? ", max length " + maxLen : "")
    );
  }

  // ------------------------------------------------------------------ upload

  function wireUpload(form) {
    var url = form.getAttribute("data-upload-url") || form.getAttribute("action");
    var input = form.querySelector('input[type="file"]');
    var zone = form.querySelector(".dropzone");
    var hasSubmit = !!form.querySelector('[type="submit"], button:not([type])');
    var maxBytes = num(parseFloat(form.getAttribute("data-max-bytes")));
    var chosen = null;
    var xhr = null;

    var status = form.querySelector(".upload-status");
    var progress = form.querySelector("progress");
    if (!progress) {
      progress = el("progress");
      progress.hidden = true;
      if (zone) zone.after(progress);
      else form.appendChild(progress);
    }
    if (!status) {
      status = el("div", "upload-status");
      status.setAttribute("aria-live", "polite");
      progress.after(status);
    }
    progress.max = 100;

    function choose(file) {
      if (!file) return;
      chosen = file;
      hideError(form);
      if (zone) {
        var name = zone.querySelector(".file-name");
        if (!name) zone.appendChild((name = el("span", "file-name")));
        name.textContent = file.name + " (" + formatBytes(file.size) + ")";
      }
      if (maxBytes != null && file.size > maxBytes) {
        showError(form, "This file is " + formatBytes(file.size) + "; the limit is " + formatBytes(maxBytes) + ".", "Split the dataset or raise the upload limit in the settings.");
        chosen = null;
        return;
      }
      if (!hasSubmit) start();
    }

    function busy(on) {
      form.classList.toggle("uploading", on);
      form.setAttribute("aria-busy", on ? "true" : "false");
      form.querySelectorAll('button[type="submit"], button:not([type]), input[type="file"]').forEach(function (b) {
        b.disabled = on;
      });
    }

    function start() {
      if (xhr) return;
      if (!chosen) {
        showError(form, "Choose a file to upload.", "Drop a file on the box or click it to pick one.");
        return;
      }
      hideError(form);
      var data = new FormData(form);
      if (input && input.name) data.delete(input.name);
      data.delete("file");
      data.append("file", chosen, chosen.name);

      xhr = new XMLHttpRequest();
      xhr.open("POST", url);
      xhr.setRequestHeader("Accept", "application/json");
      xhr.upload.addEventListener("progress", function (evt) {
        if (!evt.lengthComputable) {
          progress.removeAttribute("value");
          status.textContent = formatBytes(evt.loaded) + " uploaded";
          return;
        }
        var pct = Math.floor((evt.loaded / evt.total) * 100);
        progress.value = pct;
        status.textContent = pct + "% · " + formatBytes(evt.loaded) + " of " + formatBytes(evt.total);
      });
      xhr.addEventListener("load", function () {
        var req = xhr;
        xhr = null;
        if (req.status >= 200 && req.status < 300) {
          var body = parseJSON(req.responseText, {});
          progress.value = 100;
          status.textContent = "Uploaded. Opening the report…";
          if (body && typeof body.url === "string") {
            window.location.assign(new URL(body.url, window.location.href).href);
            return;
          }
          busy(false);
          return;
        }
        busy(false);
        progress.hidden = true;
        status.textContent = "";
        var err = errorFromBody(req.responseText, req.status);
        showError(form, err.message, err.hint);
      });
      xhr.addEventListener("error", function () {
        xhr = null;
        busy(false);
        progress.hidden = true;
        status.textContent = "";
        showError(form, "The upload did not reach the server.", "Check that Tuneboard is still running, then try again.");
      });
      xhr.addEventListener("abort", function () {
        xhr = null;
        busy(false);
        progress.hidden = true;
        status.textContent = "Upload cancelled.";
      });
      progress.hidden = false;
      progress.value = 0;
      status.textContent = "0% · 0 B of " + formatBytes(chosen.size);
      busy(true);
      xhr.send(data);
    }

    form.addEventListener("submit", function (evt) {
      evt.preventDefault();
      start();
    });
    if (input) {
      input.addEventListener("change", function () {
        choose(input.files && input.files[0]);
      });
    }
    form.querySelectorAll("[data-upload-cancel]").forEach(function (b) {
      b.addEventListener("click", function () {
        if (xhr) xhr.abort();
      });
    });
    if (zone) {
      if (!zone.hasAttribute("tabindex") && zone.tagName !== "LABEL") zone.setAttribute("tabindex", "0");
      if (!zone.hasAttribute("role") && zone.tagName !== "LABEL") zone.setAttribute("role", "button");
      ["dragenter", "dragover"].forEach(function (type) {
        zone.addEventListener(type, function (evt) {
          evt.preventDefault();
          if (evt.dataTransfer) evt.dataTransfer.dropEffect = "copy";
          zone.classList.add("dragover");
        });
      });
      ["dragleave", "dragend"].forEach(function (type) {
        zone.addEventListener(type, function (evt) {
          if (!zone.contains(evt.relatedTarget)) zone.classList.remove("dragover");
        });
      });
      zone.addEventListener("drop", function (evt) {
        evt.preventDefault();
        zone.classList.remove("dragover");
        var files = evt.dataTransfer && evt.dataTransfer.files;
        if (!files || files.length === 0) return;
        if (input) {
          try {
            input.files = files; // keeps the picker in sync; not supported everywhere
          } catch (err) {
            /* the upload uses `chosen` either way */
          }
        }
        choose(files[0]);
      });
      var openPicker = function (evt) {
        if (!input || zone.tagName === "LABEL" || evt.target === input || evt.target.closest("label, a, button")) return;
        input.click();
      };
      zone.addEventListener("click", openPicker);
      zone.addEventListener("keydown", function (evt) {
        if (evt.key === "Enter" || evt.key === " ") {
          evt.preventDefault();
          openPicker(evt);
        }
      });
    }
  }

  // ----------------------------------------------------------- chat streaming

  /** Parse a text/event-stream body incrementally; calls onEvent({event, data, id}). */
  function sseParser(onEvent) {
    var buffer = "";
    var event = { event: "message", data: [], id: null };
    function line(text) {
      if (text === "") {
        if (event.data.length) onEvent({ event: event.event, data: event.data.join("\n"), id: event.id });
        event = { event: "message", data: [], id: null };
        return;
      }
      if (text.charAt(0) === ":") return;
      var colon = text.indexOf(":");
      var field = colon < 0 ? text : text.slice(0, colon);
      var value = colon < 0 ? "" : text.slice(colon + 1);
      if (value.charAt(0) === " ") value = value.slice(1);
      if (field === "data") event.data.push(value);
      else if (field === "event") event.event = value || "message";
      else if (field === "id") event.id = value;
    }
    return {
      push: function (chunk) {
        buffer += chunk;
        var parts = buffer.split(/\r\n|\r|\n/);
        buffer = parts.pop();
        parts.forEach(line);
      },
      end: function () {
        if (buffer) line(buffer);
        line("");
      },
    };
  }

  /** The text a chat SSE `data:` carries, or {done} / {error}. */
  function readChunk(evt) {
    if (evt.event === "done" || evt.event === "end" || evt.data === "[DONE]") return { done: true };
    var body = parseJSON(evt.data, undefined);
    if (evt.event === "error" || (body && typeof body === "object" && body.error)) {
      var err = (body && body.error) || body || {};
      if (typeof err === "string") err = { message: err };
      return { error: { message: String(err.message || evt.data || "Generation failed."), hint: err.hint ? String(err.hint) : "" } };
    }
    if (body === undefined || typeof body !== "object" || body === null) {
      return { text: typeof body === "string" ? body : evt.data };
    }
    var choice = body.choices && body.choices[0];
    if (choice && choice.delta && choice.delta.tool_calls) {
      return { text: choice.delta.content || "", calls: choice.delta.tool_calls };
    }
    var text =
      (choice && choice.delta && choice.delta.content) ||
      (choice && choice.text) ||
      body.token ||
      body.text ||
      body.delta ||
      body.content ||
      "";
    return { text: typeof text === "string" ? text : "" };
  }

  /** A model's tool calls, shown as calls: the tool's name and its arguments. */
  function showCalls(msg, calls) {
    calls.forEach(function (call) {
      var fn = call.function || {};
      var box = el("div", "tool-call");
      box.appendChild(el("span", "muted small", "calls "));
      box.appendChild(el("code", "", String(fn.name || "?")));
      box.appendChild(el("pre", "", String(fn.arguments || "{}")));
      box.setAttribute("data-tool", String(fn.name || ""));
      msg.appendChild(box);
    });
  }

  function formFields(form) {
    var out = {};
    var elements = form.elements;
    for (var i = 0; i < elements.length; i++) {
      var f = elements[i];
      if (!f.name || f.disabled || f.type === "file" || f.type === "submit" || f.type === "button") continue;
      if (f.type === "checkbox") out[f.name] = f.checked;
      else if (f.type === "radio") {
        if (f.checked) out[f.name] = f.value;
      } else if (f.type === "number" || f.type === "range") {
        if (f.value !== "") out[f.name] = Number(f.value);
      } else out[f.name] = f.value;
    }
    return out;
  }

  function wireChat(form) {
    var panes = form.hasAttribute("data-stream-url")
      ? [form]
      : Array.prototype.slice.call(form.querySelectorAll("[data-stream-url]"));
    if (panes.length === 0) return;
    var prompt = form.querySelector('[name="message"], [name="prompt"]') || form.querySelector("textarea");
    var stop = form.querySelectorAll(".chat-stop, [data-chat-stop]");
    var send = form.querySelectorAll('button[type="submit"], button:not([type])');
    var states = panes.map(function (pane) {
      return { pane: pane, history: [], controller: null };
    });
    var running = 0;

    function setRunning(delta) {
      running += delta;
      stop.forEach(function (b) {
        b.disabled = running === 0;
      });
      send.forEach(function (b) {
        if (!b.matches(".chat-stop, [data-chat-stop]")) b.disabled = running > 0;
      });
      form.setAttribute("aria-busy", running > 0 ? "true" : "false");
    }
    setRunning(0);

    stop.forEach(function (b) {
      b.addEventListener("click", function (evt) {
        evt.preventDefault();
        states.forEach(function (s) {
          if (s.controller) s.controller.abort();
        });
      });
    });

    if (prompt && prompt.tagName === "TEXTAREA") {
      prompt.addEventListener("keydown", function (evt) {
        if (evt.key === "Enter" && !evt.shiftKey && !evt.isComposing) {
          evt.preventDefault();
          if (running === 0) form.requestSubmit();
        }
      });
    }

    form.addEventListener("submit", function (evt) {
      evt.preventDefault();
      if (running > 0) return;
      var text = prompt ? prompt.value : "";
      if (!text.trim()) return;
      var fields = formFields(form);
      if (prompt) prompt.value = "";
      states.forEach(function (state) {
        state.waiting = null;
        streamInto(state, fields, text);
      });
      // A chat on a GPU that is training waits for it: say behind which job.
      var gpuUrl = form.getAttribute("data-gpu-url");
      if (gpuUrl) {
        fetch(gpuUrl, { credentials: "same-origin" })
          .then(function (r) { return r.ok ? r.json() : {}; })
          .then(function (j) {
            states.forEach(function (state) {
              state.waiting = j.waiting || null;
              if (state.showStats) state.showStats(false, true);
            });
          })
          .catch(function () {});
      }
    });

    function streamInto(state, fields, text) {
      var pane = state.pane;
      var output = pane.querySelector(".chat-output");
      var stats = pane.querySelector(".chat-stats");
      if (!output) return;
      hideError(pane);
      var userMsg = el("div", "msg msg-user", text);
      var botMsg = el("div", "msg msg-assistant streaming");
      var tokens = document.createTextNode("");
      botMsg.appendChild(tokens);
      output.appendChild(userMsg);
      output.appendChild(botMsg);
      output.scrollTop = output.scrollHeight;

      var messages = state.history.concat([{ role: "user", content: text }]);
      var body = Object.assign({}, fields, { messages: messages, stream: true });
      var model = pane.getAttribute("data-model");
      if (model) body.model = model;

      var controller = new AbortController();
      state.controller = controller;
      setRunning(1);
      var started = performance.now();
      var firstAt = null;
      var count = 0;
      var lastStats = 0;

      function showStats(final, force) {
        if (!stats) return;
        var now = performance.now();
        if (!final && !force && now - lastStats < 100) return;
        lastStats = now;
        if (firstAt == null) {
          if (final) stats.textContent = "no tokens";
          else stats.textContent = state.waiting ? state.waiting + "…" : "waiting for the first token…";
          return;
        }
        var secs = (now - firstAt) / 1000;
        var rate = count > 1 && secs > 0 ? (count - 1) / secs : 0;
        stats.textContent =
          "first token " + Math.round(firstAt - started) + " ms · " + rate.toFixed(1) + " tokens/s · " + count + " tokens";
      }
      state.showStats = showStats;
      showStats(false);

      var failed = null;
      var finished = false;
      var parser = sseParser(function (e) {
        if (finished) return;
        var chunk = readChunk(e);
        if (chunk.error) {
          failed = chunk.error;
          finished = true;
          return;
        }
        if (chunk.done) {
          finished = true;
          return;
        }
        if (chunk.calls) showCalls(botMsg, chunk.calls);
        if (!chunk.text && !chunk.calls) return;
        if (firstAt == null) firstAt = performance.now();
        count++;
        if (chunk.text) tokens.appendData(chunk.text);
        var nearBottom = output.scrollHeight - output.scrollTop - output.clientHeight < 40;
        if (nearBottom) output.scrollTop = output.scrollHeight;
        showStats(false);
      });

      fetch(pane.getAttribute("data-stream-url"), {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify(body),
        credentials: "same-origin",
        signal: controller.signal,
      })
        .then(function (resp) {
          if (!resp.ok) {
            return resp.text().then(function (t) {
              failed = errorFromBody(t, resp.status);
            });
          }
          var type = resp.headers.get("content-type") || "";
          if (type.indexOf("text/event-stream") < 0 || !resp.body) {
            // A non-streaming answer: show it whole.
            return resp.text().then(function (t) {
              var json = parseJSON(t, null);
              var c = json && json.choices && json.choices[0];
              var whole = (c && c.message && c.message.content) || (c && c.text) || (json ? "" : t);
              if (whole) {
                firstAt = performance.now();
                count = 1;
                tokens.appendData(whole);
              }
            });
          }
          var reader = resp.body.getReader();
          var decoder = new TextDecoder();
          function pump() {
            return reader.read().then(function (r) {
              if (r.done) {
                parser.push(decoder.decode());
                parser.end();
                return;
              }
              parser.push(decoder.decode(r.value, { stream: true }));
              if (finished) {
                reader.cancel().catch(function () {});
                return;
              }
              return pump();
            });
          }
          return pump();
        })
        .catch(function (err) {
          if (err && err.name === "AbortError") {
            botMsg.appendChild(el("span", "muted small", " [stopped]"));
          } else {
            failed = { message: "The stream was interrupted.", hint: "Check that a worker is running, then try again." };
          }
        })
        .then(function () {
          botMsg.classList.remove("streaming");
          state.controller = null;
          state.showStats = null;
          showStats(true);
          if (failed) {
            botMsg.classList.add("msg-error");
            if (!tokens.data) botMsg.remove();
            showError(pane, failed.message, failed.hint);
          }
          if (tokens.data) {
            state.history = messages.concat([{ role: "assistant", content: tokens.data }]);
          }
          setRunning(-1);
        });
    }
  }

  // ------------------------------------------------------------ job form presets

  // A preset button sets the hyperparameters it names and nothing else: the model, the dataset
  // and the name the user picked stay. The demo model with the demo dataset takes "demo" (a
  // random-initialised model learns nothing at the other presets' learning rates); leaving that
  // pair while "demo" is on goes back to "balanced". Without script the buttons are links.
  function wireJobForm(form) {
    wireMethodFields(form);
    wireDatasetMix(form);
    var presets = parseJSON(form.getAttribute("data-presets"), {});
    var demoModel = form.getAttribute("data-demo-model");
    var demoDatasets = parseJSON(form.getAttribute("data-demo-datasets"), []);
    var buttons = document.querySelectorAll("a[data-preset]");
    var current = null;
    buttons.forEach(function (b) {
      if (b.classList.contains("primary")) current = b.getAttribute("data-preset");
    });

    function apply(name) {
      var values = presets[name];
      if (!values) return;
      Object.keys(values).forEach(function (field) {
        var input = form.elements.namedItem(field);
        if (input) input.value = values[field];
      });
      current = name;
      buttons.forEach(function (b) {
        b.classList.toggle("primary", b.getAttribute("data-preset") === name);
      });
    }

    function demoChosen() {
      var model = form.elements.namedItem("base_model");
      var dataset = form.elements.namedItem("dataset_id");
      return !!model && !!dataset && model.value === demoModel &&
        demoDatasets.indexOf(dataset.value) >= 0;
    }

    buttons.forEach(function (b) {
      b.addEventListener("click", function (evt) {
        evt.preventDefault();
        apply(b.getAttribute("data-preset"));
      });
    });
    ["base_model", "dataset_id"].forEach(function (name) {
      var select = form.elements.namedItem(name);
      if (!select) return;
      select.addEventListener("change", function () {
        if (demoChosen()) apply("demo");
        else if (current === "demo") apply("balanced");
      });
    });
  }

  // ------------------------------------------------------------ job form dataset mix

  // "Add a dataset" copies the last mix row (datasets-N-id, datasets-N-weight) as row N + 1,
  // blank, at weight 1. Without script the server renders one blank row after those sent.
  function wireDatasetMix(form) {
    var button = form.querySelector("button.add-dataset");
    var rows = form.querySelector(".mix-rows");
    if (!button || !rows) return;
    var most = parseInt(button.getAttribute("data-max"), 10);
    button.hidden = rows.querySelectorAll(".mix-row").length >= most;
    button.addEventListener("click", function () {
      var last = rows.querySelector(".mix-row:last-child");
      if (!last) return;
      var index = rows.querySelectorAll(".mix-row").length + 1;
      if (index > most) return;
      button.hidden = index >= most;
      var row = last.cloneNode(true);
      row.classList.remove("invalid");
      row.querySelectorAll("[name]").forEach(function (input) {
        var field = input.name.replace(/^datasets-\d+-/, "");
        input.name = "datasets-" + index + "-" + field;
        input.id = "f-" + input.name;
        input.value = field === "weight" ? "1" : "";
      });
      row.querySelectorAll("label[for]").forEach(function (label) {
        label.htmlFor = label.htmlFor.replace(/^f-datasets-\d+-/, "f-datasets-" + index + "-");
      });
      rows.appendChild(row);
      row.querySelector("select").focus();
    });
  }

  // ------------------------------------------------------------ job form methods

  // Fields that only some training methods read carry data-methods="dpo orpo" (on a
  // fieldset): the chosen method's are shown, the others hidden and disabled, so the
  // form never sends a setting of another method. Without script the server renders the
  // default method's.
  function wireMethodFields(form) {
    var method = form.elements.namedItem("method");
    if (!method) return;
    function show() {
      form.querySelectorAll("[data-methods]").forEach(function (node) {
        var on = node.getAttribute("data-methods").split(" ").indexOf(method.value) >= 0;
        node.hidden = !on;
        node.disabled = !on;
      });
    }
    method.addEventListener("change", show);
    show(); // the browser may have restored another method (back button)
  }

  // ------------------------------------------------------------ confirmation

  function confirmed(target) {
    var node = target && target.closest ? target.closest("[data-confirm]") : null;
    if (!node || node.hasAttribute("hx-confirm")) return true;
    return window.confirm(node.getAttribute("data-confirm"));
  }

  // Capture phase: runs before htmx's and the browser's own handling of the click.
  document.addEventListener(
    "click",
    function (evt) {
      var node = evt.target.closest && evt.target.closest("[data-confirm]");
      if (!node || node.tagName === "FORM") return;
      if (!confirmed(node)) {
        evt.preventDefault();
        evt.stopImmediatePropagation();
      }
    },
    true
  );
  document.addEventListener(
    "submit",
    function (evt) {
      if (evt.target.matches("form[data-confirm]") && !confirmed(evt.target)) {
        evt.preventDefault();
        evt.stopImmediatePropagation();
      }
    },
    true
  );

  // ------------------------------------------------------------------ wiring

  function init(root) {
    root = root || document;
    each(root, ".chart[data-chart]", function (node) {
      once(node, wireChart);
    });
    each(root, "canvas.sparkline[data-values]", function (node) {
      once(node, function (canvas) {
        // Pin the CSS size first: setting canvas.width must not change its layout size.
        var rect = canvas.getBoundingClientRect();
        if (rect.width && rect.height) {
          canvas.style.width = rect.width + "px";
          canvas.style.height = rect.height + "px";
        }
        drawSparkline(canvas);
      });
    });
    each(root, ".histogram[data-bins]", function (node) {
      once(node, wireHistogram);
    });
    each(root, "[data-progress-events]", function (node) {
      once(node, wireProgress);
    });
    each(root, "form.upload", function (node) {
      once(node, wireUpload);
    });
    each(root, "form.chat", function (node) {
      once(node, wireChat);
    });
    each(root, "form.job-form[data-presets]", function (node) {
      once(node, wireJobForm);
    });
    // Charts whose element a swap removed stop listening.
    feeds.forEach(liveCharts);
  }

  function initAfterSwap(evt) {
    var target = evt.target;
    init(target && target.isConnected ? target : document);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", function () {
      init(document);
    });
  } else {
    init(document);
  }
  document.addEventListener("htmx:afterSettle", initAfterSwap);
  document.addEventListener("htmx:load", initAfterSwap);

  // Dark/light switch: charts and canvases read colours from CSS, so redraw them.
  if (window.matchMedia) {
    var scheme = window.matchMedia("(prefers-color-scheme: dark)");
    var redraw = function () {
      feeds.forEach(function (feed) {
        feed.charts.forEach(build);
      });
      document.querySelectorAll("canvas.sparkline[data-values]").forEach(drawSparkline);
      document.querySelectorAll(".histogram[data-bins]").forEach(function (div) {
        var canvas = div.querySelector("canvas");
        if (canvas) drawHistogram(div, canvas);
      });
    };
    if (scheme.addEventListener) scheme.addEventListener("change", redraw);
  }

  // For tests and the console: read-only peeks, no behaviour.
  window.tuneboard = {
    feeds: feeds,
    sources: sources,
  };
})();
