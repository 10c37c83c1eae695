// plangate admin console: confirmations and live usage bars. No framework;
// every page works without this file (forms post, pages reload).
"use strict";
document.addEventListener("submit", function (ev) {
  var msg = ev.target.getAttribute("data-confirm");
  if (msg && !window.confirm(msg)) ev.preventDefault();
});
(function () {
  var box = document.getElementById("limits");
  if (!box || !window.fetch) return;
  var src = box.getAttribute("data-src");
  function refresh() {
    fetch(src, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) {
        // Signed out or expired: the fragment redirects to the sign-in
        // page; reload so the whole page goes there, not into the box.
        if (r.redirected) { window.location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) { if (html !== null) box.innerHTML = html; })
      .catch(function () {});
  }
  setInterval(refresh, 5000);
})();
