// Live regions: a region with data-live is fetched again every data-every milliseconds
// and replaced, until the fetched part says it is final (data-final). The HTML comes from
// this server, rendered and escaped there.
"use strict";

function follow(region) {
  const every = Number(region.dataset.every || 2000);
  const tick = async () => {
    try {
      const response = await fetch(region.dataset.live, {
        credentials: "same-origin",
        headers: { "X-Console-Live": "1" },
      });
      if (response.status === 401) {
        window.location.reload(); // the session ended: the page itself asks to sign in
        return;
      }
      if (response.ok) {
        region.innerHTML = await response.text();
      }
    } catch (error) {
      // The server is restarting or the network blinked: try again on the next tick.
    }
    if (region.querySelector("[data-final]") === null) {
      window.setTimeout(tick, every);
    }
  };
  window.setTimeout(tick, every);
}

document.querySelectorAll("[data-live]").forEach(follow);
