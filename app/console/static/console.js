// Show every <time datetime=...> in the viewer's time zone (the page says UTC without script),
// also in the parts htmx swaps in.
(function () {
  function localize(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) {
        el.textContent = when.toLocaleString();
        el.title = el.getAttribute("datetime");
      }
    });
  }
  document.addEventListener("DOMContentLoaded", function () { localize(document); });
  document.addEventListener("htmx:afterSwap", function (event) { localize(event.detail.elt.parentNode || document); });
})();
