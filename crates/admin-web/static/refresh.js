// Live refresh of the dashboard: the console's one script. Every page works without it; with
// it, the dashboard's figures follow the server while the tab is visible. Its requests say
// X-Postroom-Refresh, so a dashboard left open does not keep the session from idling out (an
// expired session answers with the login page: the refresh then stops changing anything).
"use strict";
(function () {
  const EVERY_MS = 15000;
  async function refresh() {
    if (document.visibilityState !== "visible") return;
    try {
      const response = await fetch(location.pathname, {
        headers: { "X-Postroom-Refresh": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (!response.ok || response.redirected) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html").querySelector("main");
      const shown = document.querySelector("main");
      if (fresh && shown) shown.replaceWith(fresh);
    } catch (e) {
      // The server restarting or the network gone: the next round tries again.
    }
  }
  setInterval(refresh, EVERY_MS);
})();
