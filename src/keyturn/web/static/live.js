// keyturn dashboard: a page with data-poll-ms on <body> fetches itself every so often and
// swaps in the regions marked data-live (by id) that changed. A region whose form someone is
// filling in is left alone. The next poll waits for this one, and the server says how long to
// wait (a page that costs it more is polled less often). No build step, no framework.
(function () {
  "use strict";
  var ms = Number(document.body.getAttribute("data-poll-ms") || 0);
  if (!ms) { return; }
  var stopped = false;
  function say(text) {
    var s = document.getElementById("live-status");
    if (s) { s.textContent = text; }
  }
  function editing(region) {
    var fields = region.querySelectorAll("textarea, input[type=text], input:not([type])");
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].value || fields[i] === document.activeElement) { return true; }
    }
    return false;
  }
  function later() {
    if (!stopped) { window.setTimeout(tick, ms); }
  }
  function tick() {
    if (document.hidden) { later(); return; }
    fetch(window.location.href, {
      headers: { "X-Keyturn-Live": "1" },
      credentials: "same-origin",
      redirect: "error",
      cache: "no-store"
    }).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.text();
    }).then(function (html) {
      var fresh = new DOMParser().parseFromString(html, "text/html");
      var next = Number(fresh.body.getAttribute("data-poll-ms") || 0);
      if (next > 0) { ms = next; }
      var regions = document.querySelectorAll("[data-live]");
      for (var i = 0; i < regions.length; i++) {
        var el = regions[i];
        var now = fresh.getElementById(el.id);
        if (now && now.innerHTML !== el.innerHTML && !editing(el)) {
          el.innerHTML = now.innerHTML;
        }
      }
      say("Updated " + new Date().toISOString().slice(11, 19) + " UTC; this page updates itself.");
    }).catch(function (err) {
      stopped = true;
      say("Live updates stopped (" + err.message + "): reload the page (or sign in again).");
    }).then(later);
  }
  later();
})();
