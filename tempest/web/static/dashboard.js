// tempest dashboard: refresh the page's live parts from its JSON twin every 2 s
// (?live=N on the Nth refresh: the task page looks in the queue on some only).
// Everything from the server is written with textContent or setAttribute, never
// as markup, so a task's id, arguments or error can never run as script.
(function () {
  "use strict";

  var EVERY = 2000;
  var SVG = "http://www.w3.org/2000/svg";

  function meta(name) {
    var element = document.querySelector('meta[name="' + name + '"]');
    return element ? element.getAttribute("content") : null;
  }

  var api = meta("tempest-api");
  var token = meta("tempest-csrf");
  var status = document.getElementById("live-status");
  var refreshes = 0;

  function text(value) {
    return value === null || value === undefined ? "" : String(value);
  }

  // Links stay within this site: a path, never a scheme such as javascript:, nor
  // another host: browsers read "/\evil.com" as "//evil.com" and drop tabs and
  // line breaks ("/\t/evil.com"), so neither may appear at all.
  function localHref(href) {
    return typeof href === "string" && href.charAt(0) === "/" && href.charAt(1) !== "/" &&
      !/[\\\t\n\r]/.test(href) ? href : null;
  }

  function actionForm(action) {
    var form = document.createElement("form");
    var url = localHref(action.url);
    form.method = "post";
    form.className = "inline";
    if (url) { form.setAttribute("action", url); }
    var fields = Object.assign({ csrf: token }, action.fields || {});
    Object.keys(fields).forEach(function (name) {
      var input = document.createElement("input");
      input.type = "hidden";
      input.name = name;
      input.value = text(fields[name]);
      form.appendChild(input);
    });
    if (action.kind === "delete") {
      form.setAttribute("data-confirm",
        "Delete " + text((action.fields || {}).task_id) + " from the failed store?");
    }
    var button = document.createElement("button");
    button.type = "submit";
    button.className = text(action.kind);
    button.textContent = text(action.label);
    form.appendChild(button);
    return form;
  }

  function cell(value) {
    var td = document.createElement("td");
    if (value === null || typeof value !== "object") {
      td.textContent = text(value);
    } else if (value.href !== undefined) {
      var href = localHref(value.href);
      if (href) {
        var a = document.createElement("a");
        a.setAttribute("href", href);
        a.textContent = text(value.text);
        td.appendChild(a);
      } else {
        td.textContent = text(value.text);
      }
    } else if (value.pre !== undefined) {
      var details = document.createElement("details");
      var summary = document.createElement("summary");
      var pre = document.createElement("pre");
      summary.textContent = text(value.summary);
      pre.textContent = text(value.pre);
      details.appendChild(summary);
      details.appendChild(pre);
      td.appendChild(details);
    } else if (value.actions) {
      value.actions.forEach(function (action) { td.appendChild(actionForm(action)); });
    } else {
      td.textContent = text(value.text);
    }
    return td;
  }

  function updateSection(name, section) {
    var note = document.querySelector('[data-section-note="' + name + '"]');
    var message = section.unavailable || section.error || "";
    if (note) {
      note.textContent = message;
      note.hidden = !message;
    }
    var table = document.querySelector('table[data-section="' + name + '"]');
    if (!table || !table.tBodies.length) { return; }
    var body = table.tBodies[0];
    // Keep a row whose traceback the user has unfolded: rebuild only when it changed.
    var open = {};
    body.querySelectorAll("details[open] > summary").forEach(function (summary) {
      open[summary.textContent] = true;
    });
    var rows = document.createDocumentFragment();
    (section.rows || []).forEach(function (row) {
      var tr = document.createElement("tr");
      row.forEach(function (value) { tr.appendChild(cell(value)); });
      tr.querySelectorAll("details > summary").forEach(function (summary) {
        if (open[summary.textContent]) { summary.parentNode.open = true; }
      });
      rows.appendChild(tr);
    });
    if (!(section.rows || []).length && !message) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      tr.className = "empty";
      td.colSpan = table.tHead ? table.tHead.rows[0].cells.length : 1;
      td.textContent = text(section.empty);
      tr.appendChild(td);
      rows.appendChild(tr);
    }
    body.replaceChildren(rows);
  }

  function svg(name, attributes) {
    var element = document.createElementNS(SVG, name);
    Object.keys(attributes).forEach(function (key) {
      element.setAttribute(key, text(attributes[key]));
    });
    return element;
  }

  function updateChart(name, chart) {
    var note = document.querySelector('[data-chart-note="' + name + '"]');
    var message = chart.unavailable || chart.error || "";
    if (note) {
      note.textContent = message;
      note.hidden = !message;
    }
    var root = document.querySelector('svg[data-chart="' + name + '"]');
    if (!root) { return; }
    var bars = root.querySelector("g.bars");
    var labels = root.querySelector("g.labels");
    var newBars = document.createDocumentFragment();
    (chart.bars || []).forEach(function (bar) {
      var group = svg("g", {});
      var title = svg("title", {});
      title.textContent = text(bar.title);
      group.appendChild(title);
      group.appendChild(svg("rect", { "class": "slot", x: bar.x, y: 0, width: bar.w,
                                      height: chart.baseline }));
      (bar.segments || []).forEach(function (segment) {
        group.appendChild(svg("rect", { "class": "o-" + text(segment.outcome), x: bar.x,
                                        y: segment.y, width: bar.w, height: segment.h }));
      });
      newBars.appendChild(group);
    });
    bars.replaceChildren(newBars);
    var newLabels = document.createDocumentFragment();
    (chart.labels || []).forEach(function (label) {
      var element = svg("text", { x: label.x, y: label.y });
      element.textContent = text(label.text);
      newLabels.appendChild(element);
    });
    labels.replaceChildren(newLabels);
  }

  function apply(view) {
    var fields = view.fields || {};
    document.querySelectorAll("[data-field]").forEach(function (element) {
      var name = element.getAttribute("data-field");
      if (Object.prototype.hasOwnProperty.call(fields, name)) {
        element.textContent = text(fields[name]);
      }
    });
    var sections = view.sections || {};
    Object.keys(sections).forEach(function (name) { updateSection(name, sections[name]); });
    if (view.chart) { updateChart("outcomes", view.chart); }
  }

  function setStatus(message, ok) {
    if (!status) { return; }
    status.textContent = message;
    status.className = ok ? "live" : "live lost";
  }

  function refresh() {
    if (document.hidden) {
      window.setTimeout(refresh, EVERY);
      return;
    }
    refreshes += 1;
    var search = window.location.search;
    fetch(api + (search ? search + "&" : "?") + "live=" + refreshes, {
      credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" }
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.json();
    }).then(function (view) {
      apply(view);
      setStatus("live · " + new Date().toLocaleTimeString(), true);
    }).catch(function (error) {
      setStatus("connection lost (" + error.message + "); retrying", false);
    }).then(function () {
      window.setTimeout(refresh, EVERY);
    });
  }

  // Ask before the destructive buttons (no inline handlers: the CSP forbids them).
  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });

  if (api) { window.setTimeout(refresh, EVERY); }
}());
