// Roster console. Keeps the page's live region current from its server-sent-event stream (the
// server renders every update; this only swaps it in) and filters the services list as you
// type. No framework, no request to anywhere but this server.
(function () {
  "use strict";

  var badge = document.getElementById("live-state");
  function say(text, tone) {
    if (badge) {
      badge.textContent = text;
      badge.className = "badge " + tone;
    }
  }

  // Services: hide the rows whose name does not contain the filter, and keep it in the URL
  // (?q=...) so a reload or a shared link shows the same list.
  var filter = document.getElementById("filter");
  function applyFilter() {
    if (!filter) return;
    var needle = filter.value.trim().toLowerCase();
    var rows = document.querySelectorAll("tr[data-name]");
    var shown = 0;
    rows.forEach(function (row) {
      var match = row.getAttribute("data-name").indexOf(needle) !== -1;
      row.hidden = !match;
      if (match) shown += 1;
    });
    var none = document.getElementById("no-match");
    if (none) none.hidden = rows.length === 0 || shown > 0;
  }
  if (filter) {
    filter.addEventListener("input", function () {
      applyFilter();
      var url = new URL(window.location.href);
      if (filter.value) url.searchParams.set("q", filter.value);
      else url.searchParams.delete("q");
      window.history.replaceState(null, "", url.pathname + url.search);
    });
    if (filter.form) {
      filter.form.addEventListener("submit", function (event) {
        event.preventDefault();
      });
    }
    applyFilter();
  }

  // Narrow screens show the rows of `table.stack` as blocks: each cell is labelled with its
  // column's header.
  function labelCells() {
    document.querySelectorAll("table.stack").forEach(function (table) {
      var heads = Array.prototype.map.call(table.querySelectorAll("thead th"), function (th) {
        return th.textContent;
      });
      table.querySelectorAll("tbody tr").forEach(function (row) {
        Array.prototype.forEach.call(row.cells, function (cell, i) {
          if (heads[i] && cell.colSpan === 1) cell.setAttribute("data-label", heads[i]);
        });
      });
    });
  }
  labelCells();

  // The live region: replaced by each "main" event of its stream.
  var region = document.getElementById("live");
  if (!region || !region.getAttribute("data-live") || !window.EventSource) return;
  var source = new EventSource(region.getAttribute("data-live"));
  source.addEventListener("open", function () {
    say("live", "good");
  });
  source.addEventListener("main", function (event) {
    region.innerHTML = event.data;
    region.setAttribute("data-updated", String(Date.now()));
    labelCells();
    applyFilter();
    say("live", "good");
  });
  source.addEventListener("error", function () {
    if (source.readyState === EventSource.CLOSED) {
      // Refused: the sign-in ended, or the server is restarting. A reload shows which.
      say("disconnected", "bad");
      window.setTimeout(function () {
        window.location.reload();
      }, 3000);
    } else {
      say("reconnecting", "warn");
    }
  });
})();
