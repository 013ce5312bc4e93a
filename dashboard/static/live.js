// mend dashboard: refreshes a page's live part in place. The element with `data-live="N"` is
// fetched again every N seconds (the same address, the same session) and swapped for the new one,
// so the scroll position, the focus outside it and the details a person opened stay as they were.
// Without this script the page reloads itself (a <noscript> meta refresh). A session that ended
// (the fetch lands on the login page) or an answer that is not the page reloads it as a whole.
(function () {
  'use strict';
  var live = document.querySelector('[data-live]');
  if (!live) return;
  var every = Math.max(2, parseInt(live.getAttribute('data-live'), 10) || 15) * 1000;
  var busy = false;

  function openDetails(root) {
    var open = {};
    root.querySelectorAll('details[id]').forEach(function (d) { if (d.open) open[d.id] = true; });
    return open;
  }

  function refresh() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(window.location.href, { credentials: 'same-origin', headers: { 'Accept': 'text/html' } })
      .then(function (res) {
        if (!res.ok || res.redirected) throw new Error('reload');
        return res.text();
      })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, 'text/html').querySelector('[data-live]');
        if (!fresh) throw new Error('reload');
        var open = openDetails(live);
        fresh.querySelectorAll('details[id]').forEach(function (d) { d.open = !!open[d.id]; });
        var adopted = document.importNode(fresh, true);
        live.replaceWith(adopted);
        live = adopted;
        document.dispatchEvent(new CustomEvent('mend:refreshed'));
      })
      .catch(function () { window.location.reload(); })
      .finally(function () { busy = false; });
  }

  setInterval(refresh, every);
  document.addEventListener('visibilitychange', function () { if (!document.hidden) refresh(); });
})();
