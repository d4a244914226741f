// The login page, also served (with status 401) in place of any page that needs a session.
const params = new URLSearchParams(location.search);
if (params.has("token")) {
  document.getElementById("login-bad").hidden = false;
}
let next = params.get("next");
if (!next && location.pathname !== "/login") {
  const rest = new URLSearchParams(location.search);
  rest.delete("token");
  next = location.pathname + (rest.toString() ? `?${rest}` : "");
}
if (next && next.startsWith("/") && !next.startsWith("//")) {
  const input = document.createElement("input");
  input.type = "hidden";
  input.name = "next";
  input.value = next;
  document.querySelector("form").appendChild(input);
}
document.getElementById("token").focus();
