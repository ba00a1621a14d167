// Exchange the dashboard token for an HttpOnly session cookie, then load the dashboard.
// A link of the form http://host:port/#token=... logs in at once (the fragment never
// reaches the server or its logs).
"use strict";
async function login(token) {
  const resp = await fetch("/api/session", {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ token }),
  });
  if (resp.ok) { location.replace(location.pathname + location.search); return; }
  document.getElementById("login-msg").textContent = "wrong token";
}
document.getElementById("login").addEventListener("submit", (e) => {
  e.preventDefault();
  login(document.getElementById("token").value);
});
const m = location.hash.match(/token=([^&]+)/);
if (m) { history.replaceState(null, "", location.pathname + location.search); login(decodeURIComponent(m[1])); }
