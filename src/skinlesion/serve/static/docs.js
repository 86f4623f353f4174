// Starts Swagger UI on /docs (the swagger-ui-bundle-v2 package's files, served from /swagger/). A file, not an
// inline script, so /docs runs under the same strict Content-Security-Policy as the main page.
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null, // no badge fetched from validator.swagger.io: the page works offline
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
