// Live inbox: when the server says the mailbox changed, fetch the list again and swap it
// in. The page works without this script; it only saves the reload.
"use strict";
(function () {
  const live = document.getElementById("live");
  if (!live || !window.EventSource) return;
  const events = new EventSource("/events?since=" + encodeURIComponent(live.dataset.mark));
  events.addEventListener("mailbox", async function () {
    const answer = await fetch(live.dataset.src, { credentials: "same-origin" });
    // redirected: the session ended and this is the login form; the whole page goes there
    if (answer.redirected) window.location.reload();
    else if (answer.ok) live.innerHTML = await answer.text();
  });
})();
