// The service worker of im's browser client: it shows the Web Push notifications the server
// sends for messages that arrive while none of the user's devices is online
// (docs/PROTOCOL.md, "Offline push"). The payload is the server's JSON, decrypted by the
// browser: {type: "message", user, conv, from, from_name, id, seq, ts, preview}.
// A click focuses an open tab of the client and opens the conversation, or opens one.

'use strict';

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('push', (event) => {
  let p = {};
  try {
    p = event.data ? event.data.json() : {};
  } catch {
    p = {};   // not ours, or not JSON: still say something (browsers require a notification)
  }
  const title = p.from_name ? String(p.from_name) : 'New message';
  const body = typeof p.preview === 'string' && p.preview ? p.preview : 'You have a new message';
  // One notification per conversation: a newer message replaces the older one.
  event.waitUntil(self.registration.showNotification(title, {
    body,
    tag: typeof p.conv === 'string' ? p.conv : 'im',
    renotify: true,
    data: { conv: typeof p.conv === 'string' ? p.conv : null, id: p.id || null },
  }));
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  const conv = event.notification.data && event.notification.data.conv;
  event.waitUntil((async () => {
    const tabs = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
    for (const tab of tabs) {
      tab.postMessage({ type: 'open', conv });
      return tab.focus();
    }
    return self.clients.openWindow(conv ? `/#conv=${encodeURIComponent(conv)}` : '/');
  })());
});
