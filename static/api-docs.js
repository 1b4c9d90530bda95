// Starts Swagger UI on /api/docs from the vendored bundle (no inline script: the CSP allows only
// this site's own files). The token, when one is set, travels as the login cookie.
window.addEventListener("DOMContentLoaded", function () {
  window.SwaggerUIBundle({
    url: "/api/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
  });
});
