// condo's placeholder dashboard: lists /v1/state in plain text (textContent only, never HTML).
// A later issue replaces it with the live dashboard over the websocket feed.
(async () => {
  const host = document.getElementById("host");
  const out = document.getElementById("services");
  try {
    const response = await fetch("/v1/state", {headers: {"Accept": "application/json"}});
    if (!response.ok) {
      host.textContent = "GET /v1/state answered " + response.status;
      return;
    }
    const state = await response.json();
    host.textContent = "host: " + state.host;
    const lines = Object.entries(state.services).map(([name, service]) => {
      const image = service.current ? service.current.image : "-";
      return name + "  " + service.state + "  " + image;
    });
    out.textContent = lines.length ? lines.join("\n") : "(no services)";
  } catch (error) {
    host.textContent = "cannot read /v1/state: " + error;
  }
})();
