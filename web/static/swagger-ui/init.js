// Kairos: render /api-docs.json with the vendored Swagger UI (no inline script, no CDN).
window.ui = SwaggerUIBundle({
  url: "/api-docs.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
